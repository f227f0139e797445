"""The base experiment config: every hyperparameter jaxad reads, with its meaning.

Experiment files in `configs/` start from `get_config()` and override what their paper
sets. The config is locked before command-line overrides apply, so a mistyped key
(`--config.model.latnet_dim=8`) fails instead of being ignored.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """Returns the base config (the small digits VAE)."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # The only seed: data order, init, z samples all derive from it.

  c.data = d = ml_collections.ConfigDict()
  d.source = "digits"  # tfds | folder | nifti | csv | npz | digits | synthetic
  d.name = ""  # tfds: dataset name, e.g. "mnist", "fashion_mnist".
  d.data_dir = ""  # tfds: where prepared datasets live ("" = tfds default).
  d.image_key = "image"  # tfds: feature holding the image.
  d.label_key = "label"  # tfds: feature holding the class label.
  d.path = ""  # folder root | .npz file | CSV file (may contain "{split}").
  d.image_dir = ""  # csv: folder of the images ("" = the CSV's folder).
  d.image_ext = ".jpg"  # csv: extension appended to ids that have none.
  d.id_column = "image"  # csv: column with the image id.
  d.label_column = ""  # csv: single label column ("" = one-hot class columns).
  d.group_column = ""  # csv: patient/subject id for stratified bootstrap.
  d.mask_dir = ""  # csv: folder of lesion masks (X_segmentation.png or X.png).
  d.ndim = 0  # npz: spatial rank, 0 = infer, 2 = images, 3 = volumes.
  d.train_split = "train"  # split names as the source knows them
  d.val_split = "val"  # "" = hold val_fraction of the train split out
  d.test_split = "test"
  d.val_fraction = 0.0  # used only when val_split is "".
  d.val_anomaly_fraction = 0.0  # > 0: when the validation split has no anomalous image,
  # move this part of the test split's anomalous images (whole patients with
  # group_column) into it, out of test, so scores and thresholds are chosen on labelled
  # anomalies without touching the test split. 0 = off.
  d.on_device = "auto"  # keep the preprocessed train/val images on the devices:
  # auto (when they fit in data.on_device_fraction of device memory) | true | false.
  d.on_device_fraction = 0.25
  d.check_files = True  # folder/nifti/csv: decode every file before compiling, and
  # name every unreadable one (else a bad file stops the run when it is read).
  d.check_files_max = 20_000  # ...for splits of at most this many examples (0 = any).
  d.normal_classes = ()  # class names or indices seen in training ("*" = all)...
  d.anomalous_classes = ()  # ...or their complement; set exactly one of the two.
  d.image_size = 32  # every side is resized to this (conv VAE: 4·2^k).
  d.resize = "bilinear"  # bilinear | nearest: nearest keeps every value on the stored
  # levels, so a discrete decoder's likelihood is the bits of the (resized) image.
  d.depth = 0  # volumes: depth after resizing (0 = same as image_size).
  d.channels = 1  # 1 = grayscale, 3 = RGB (converted if the data differs).
  d.intensity = "fixed"  # fixed: map intensity_range to [-1, 1]; minmax: per image.
  d.intensity_range = ()  # (lo, hi); () = dtype range (uint8 0..255,
  # uint16 0..65535, float 0..1). Set e.g. (0, 4095) for 12-bit data, or a CT window.
  d.bit_depth = 8  # bits per value of the stored images (8: PNG/JPEG/uint8, 16 or e.g.
  # 12 for CT): complexity scores code the image at this depth; mutation draws levels.
  d.synthetic = ml_collections.ConfigDict(dict(
      num_examples=64, image_size=32, channels=1, anomaly_fraction=0.5))

  d.synthetic_lesions = ml_collections.ConfigDict(dict(  # for pixel-wise evaluation
      enabled=False,  # eval: insert lesions (with masks) into the normal test images
      kinds=("ellipse", "noise", "patch"), fraction=0.5, min_radius=0.08,
      max_radius=0.2, intensity=0.6, noise_std=0.5, seed=0))

  c.model = m = ml_collections.ConfigDict()
  m.family = "vae"  # vae | score (SANO's VP-SDE score model) | gan (latent search)
  m.name = "conv_vae"  # vae: conv_vae | mlp_vae; score: unet; gan: dcgan | wgan_gp
  m.latent_dim = 16  # vae: posterior dimension; gan: z dimension (100 in DCGAN).
  m.widths = (16, 32, 64)  # conv: channels per stride-2 block; () = DCGAN default.
  m.base_width = 32  # conv: first width of the DCGAN default.
  m.norm = "batch"  # conv: batch | none
  m.encoder_activation = "leaky_relu"
  m.decoder_activation = "relu"
  m.hidden = (400, 400, 400)  # mlp: hidden layer sizes.
  m.activation = "relu"  # mlp: activation of the hidden layers.
  m.likelihood = "gaussian"  # gaussian: N(g(z), beta/2 I); bernoulli: logits;
  # gaussian_learned: a mean and a variance per value (AE-U); discretized_logistic:
  # PixelCNN++'s logistic (mixture) on the 2^data.bit_depth levels, −ELBO in the image's bits.
  m.likelihood_mixtures = 1  # discretized_logistic: K logistics per value (1 = plain).
  m.beta = 0.01  # gaussian: loss = SSE + beta·KL = beta·(−ELBO) + const (Lu & Xu);
  # the other likelihoods: loss = −log p(x|z) + beta·KL (beta = 1: the −ELBO).
  m.unet = ml_collections.ConfigDict(dict(  # score: DDPM ε-prediction U-Net
      base_width=64,  # channels of the first level; time embedding 4× this.
      channel_mult=(1, 2, 2, 2),  # width multiplier per level (one stride-2 step between).
      num_res_blocks=2,  # residual blocks per level (the up path has one more).
      attention_resolutions=(16,),  # self-attention at these feature-map sides.
      dropout=0.0,
      groups=32,  # GroupNorm groups (fewer when a width is smaller).
      embedding="sinusoidal",  # time embedding: sinusoidal | fourier
      fourier_scale=16.0))
  m.sde = ml_collections.ConfigDict(dict(  # score: the VP-SDE (Song et al. 2021)
      beta_min=0.1, beta_max=20.0,  # β(t) linear on t ∈ [0, 1]
      num_scales=1000,  # N: the discrete form has β_i = linspace(β_min/N, β_max/N, N)
      discrete=False,  # True: DDPM's N-step chain (t on the grid i/(N−1))
      t_eps=1e-5,  # continuous: training t ~ U(t_eps, 1)
      weighting="sigma2"))  # DSM weight λ(t): sigma2 (σ_t², usual) | likelihood (β(t))
  m.gan = ml_collections.ConfigDict(dict(  # gan: sides b·2^k, b in 4..7 (28 = 7·2²)
      generator_norm="batch",  # batch | none
      discriminator_norm="",  # '' = batch for dcgan, layer for wgan_gp | batch | layer | none
      critic_steps=0,  # discriminator updates per generator update (0 = 1 dcgan, 5 wgan_gp)
      gp_weight=10.0,  # wgan_gp: gradient penalty weight λ
      max_width=512))  # cap of the default widths (model.widths=())

  c.eval = e = ml_collections.ConfigDict()
  e.batch_size = 64  # global batch for scoring (padded; every image scored once).
  e.num_samples = 15  # L: samples z ~ q(z|x) for the vae and iwae scores.
  e.pixel_maps = True  # compute pixel maps when the split has masks or lesions.
  e.save_maps = True  # write eval/<split>/maps.npz (in chunks) whenever maps are computed:
  # for the pixel metrics (masks or lesions: saving costs disk, not compute) and for
  # --input runs; never beyond max_saved_maps_mb (metrics.json says which and why).
  e.max_saved_maps_mb = 1024  # the largest maps.npz written by default (float32).
  e.smooth_sigma = 0.0  # gaussian smoothing of the pixel maps (pixels; 0 = off).
  e.n_sigma = 3.0  # unsupervised threshold: mean + n·std of healthy validation maps.
  e.threshold_quantile = 0.95  # image threshold: this quantile of the healthy validation
  # images' scores (beside mean + n_sigma·std of them and, with anomalies, best F1).
  e.calibration_fraction = 0.2  # Zimmerer et al.: threshold chosen on 1/5, Dice on 4/5.
  e.pixel_bins = 10_000  # histogram bins of the streaming pixel AUROC/AUPRC.
  e.bootstrap = 50  # bootstrap resamples for the AUROC intervals (0 = off); pixel
  # intervals resample per-image histograms in the pixel_bins of the point estimate.
  e.num_examples = 8  # images shown in the report's grids.
  e.latent_steps = 100  # gan: latent-search steps per image (AnoGAN; the thesis: 100)
  e.latent_lr = 1e-3  # gan: SGD learning rate of the search (the loss sums over pixels)
  e.latent_momentum = 0.9  # gan: SGD momentum
  e.latent_lambda = 0.5  # gan: λ, weight of the discriminator-feature term
  e.sano = ml_collections.ConfigDict(dict(  # score models (Gonzalez-Jimenez et al.)
      t=1e-3,  # the map: score s(x, t) of the clean image at this small t
      smooth_sigma=2.0,  # gaussian filter of the map (pixels)
      top_k_fraction=0.01,  # sano_topk: mean of the largest 1% of map values
      dsm_t=0.05,  # dsm score: the DSM loss at this t...
      dsm_samples=4))  # ...averaged over this many noise draws
  e.prob_flow = ml_collections.ConfigDict(dict(  # score: exact likelihood (optional)
      enabled=False,  # add prob_flow_nll (nats/image) and prob_flow_bpd
      steps=50,  # RK4 steps of the probability-flow ODE from t_eps to 1
      probes=1,  # Rademacher probes of the Hutchinson trace estimator
      levels=256))  # intensity levels for dequantisation (0 = continuous data)
  e.regret = ml_collections.ConfigDict(dict(  # vae: Likelihood Regret (Xiao et al. 2020)
      enabled=False,  # add vae_regret (nats): the bound's gain when q(z|x) is fitted to
      # the image alone (jaxad.scores.regret; each image costs `steps` extra passes)
      target="encoder",  # encoder: every encoder weight, per image (the paper) |
      # posterior: q(z|x)'s (mu, logvar) only (cheaper)
      steps=100,  # Adam steps per image (the paper: 100)
      learning_rate=0.0,  # Adam; 0 = the target's default: 1e-4 encoder (the paper),
      # 1e-2 posterior
      samples_per_step=1,  # z samples in each step's −ELBO (the paper: 1)
      num_samples=15,  # L: the same L draws of eps give the bound before and after
      bound="elbo"))  # elbo (what the steps optimise) | iwae (the paper's −log p(x))
  e.complexity = True  # Serrà et al.: jpegxl_bpd, png_bpd and S = bpd − L(x)/D of every
  # likelihood score (vae_complexity, iwae_complexity, prob_flow_complexity, *_png)
  e.complexity_cache = "auto"  # code lengths cached by image content and coder settings,
  # so scoring many checkpoints on one test set codes it once: "auto" = $JAXAD_CACHE_DIR,
  # else $XDG_CACHE_HOME/jaxad/complexity, else ~/.cache/jaxad/complexity; a folder; "" off

  c.background = b = ml_collections.ConfigDict()  # Ren et al. 2019: likelihood ratio
  b.enabled = False  # train: also train WORKDIR/background; eval: add the *_llr scores
  b.mutation_rate = 0.2  # each training value replaced by a uniform random level with
  # this probability (Ren et al.: 0.1–0.3); 0 with a generic dataset (background.source)
  b.width_factor = 0.5  # its widths (hidden sizes, U-Net base width) = the model's × this
  b.source = ""  # "" = the model's own normal training images; else a data.source of a
  b.name = ""  # generic dataset (tfds name, or path: every class of its train split)
  b.path = ""

  c.train = t = ml_collections.ConfigDict()
  t.batch_size = 32  # global batch, split over every device of every host.
  t.num_epochs = 20
  t.num_steps = -1  # > 0 overrides num_epochs.
  t.learning_rate = 1e-4  # Adam.
  t.b1 = 0.9
  t.b2 = 0.999
  t.eps = 1e-8
  t.warmup_steps = 0  # linear learning-rate warm-up over this many steps (0 = off).
  t.grad_clip = 0.0  # clip the global gradient norm to this (0 = off).
  t.mutation_rate = 0.0  # Ren et al.'s input perturbation (the background model sets it)
  t.ema_rate = 0.0  # keep an EMA of the parameters, used by eval (0 = off).
  t.plateau_patience = 0  # epochs without val improvement before lr×factor (0 = off).
  t.plateau_factor = 0.1
  t.early_stop_patience = 0  # epochs without val improvement before stopping (0 = off).
  t.min_delta = 0.0  # improvement smaller than this (nats) does not count.
  t.checkpoint_every_steps = 500
  t.keep_checkpoints = 3
  t.log_every_steps = 50
  t.progress_bar = True
  t.compute_dtype = "float32"  # float32 | bfloat16: activations and matmuls (accelerators);
  # parameters, optimiser state, losses and scores stay float32.
  t.prefetch_to_device = 2  # batches copied to the devices ahead of the step (0 = none).
  return c


def use_dcgan128_vae(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Liu & Mitrovic's VAE (also Lu & Xu's): 128×128 → 5 stride-2 blocks, latent 300.

  DCGAN-like, BatchNorm, LeakyReLU encoder and ReLU decoder, separate conv heads for
  mean and log-variance; loss SSE + 0.01·KL; Adam 1e-4, batch 32, 40 epochs.
  """
  config.data.image_size = 128
  m = config.model
  m.name = "conv_vae"
  m.widths = (32, 64, 128, 256, 512)
  m.latent_dim = 300
  m.norm = "batch"
  m.encoder_activation = "leaky_relu"
  m.decoder_activation = "relu"
  m.likelihood = "gaussian"
  m.beta = 0.01
  t = config.train
  t.batch_size = 32
  t.num_epochs = 40
  t.learning_rate = 1e-4
  t.checkpoint_every_steps = 1000
  t.log_every_steps = 100
  return config


def use_zimmerer_schedule(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Zimmerer et al.'s optimisation: Adam 1e-4, ×0.1 on a validation plateau, stop
  after 3 epochs without improvement (batch 64, at most 100 epochs)."""
  t = config.train
  t.batch_size = 64
  t.num_epochs = 100
  t.learning_rate = 1e-4
  t.plateau_patience = 2
  t.early_stop_patience = 3
  t.checkpoint_every_steps = 1000
  t.log_every_steps = 100
  return config
