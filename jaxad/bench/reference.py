"""The PyTorch reference's numbers beside jaxad's: its FLOP counts, ids and results.

../shared/bench/peer_torch.py and peer_torch_gan.py time the same cases; `--torch_json`
reads their results files, and every case with a reference gets its images/s and the
jaxad/torch ratio.
"""

from collections.abc import Sequence

from jaxad import files
from jaxad.bench.cases import IWAE_L

# The reference's case for each of ours (for --torch_json): peer_torch.py's ids, and
# peer_torch_gan.py's for the MNIST DCGAN.
TORCH_CASE = {f"score_iwae_L{IWAE_L}": f"score_iwae_L{IWAE_L}_batched"}
TORCH_MODEL = {"gan": "dcgan28"}
# MFLOP per image of the reference (matmul/conv only), from its README results table.
REFERENCE_MFLOP = {
    "conv128/train_step": 1717.8, "conv128/score_elbo": 576.8,
    "conv128/score_iwae_L15": 4579.9, "conv128/pixel_grads": 2021.2,
    "conv64/train_step": 122.2, "conv64/score_elbo": 40.9,
    "conv64/score_iwae_L15": 312.5, "conv64/pixel_grads": 144.2,
    "mlp28/train_step": 7.1, "mlp28/score_elbo": 2.6,
    "mlp28/score_iwae_L15": 20.5, "mlp28/pixel_grads": 9.0,
    "score64/train_step": 35338.7, "score64/score_map": 11784.3,
}


def torch_case_id(case_id: str) -> str:
  """The reference's id for one of ours (score_iwae_L15 → ..._batched, gan → dcgan28)."""
  model, case = case_id.split("/")
  return f"{TORCH_MODEL.get(model, model)}/{TORCH_CASE.get(case, case)}"


def load_torch_results(paths: Sequence[str]) -> dict:
  """The reference results of every file, in peer_torch.py's layout.

  peer_torch.py writes {"meta", "peak_gflops_reference", "cases": {id: {...}}};
  peer_torch_gan.py writes {id: images/s}. Later files add their cases to earlier ones.
  """
  merged = {"cases": {}}
  for path in paths:
    data = files.read_json(path)
    if not isinstance(data, dict):
      raise ValueError(f"--torch_json {path}: expected a JSON object of reference results")
    if "cases" in data:
      merged.update({k: v for k, v in data.items() if k != "cases"})
      merged["cases"].update(data["cases"])
      continue
    bad = [k for k, v in data.items() if "/" not in k or not isinstance(v, (int, float))]
    if bad:
      raise ValueError(f"--torch_json {path}: neither peer_torch.py's layout (a 'cases' "
                       f"key) nor peer_torch_gan.py's ({{case id: images/s}}); bad keys {bad}")
    merged["cases"].update({k: {"images_per_s": float(v)} for k, v in data.items()})
  return merged


def add_torch(results: dict, torch_results: dict) -> None:
  """Adds the reference's images/s, FLOP count and the jaxad/torch ratio per case."""
  theirs = torch_results.get("cases", {})
  for cid, r in results["cases"].items():
    t = theirs.get(torch_case_id(cid))
    if t is None:
      continue
    r["torch_case"] = torch_case_id(cid)
    r["torch_images_per_s"] = t["images_per_s"]
    r["jax_over_torch"] = r["images_per_s"] / t["images_per_s"]
    if "flops_per_image" in t:
      r["reference_mflop_per_image"] = t["flops_per_image"] / 1e6
  meta = torch_results.get("meta", {})
  results["torch"] = dict(torch=meta.get("torch"), date=meta.get("date"),
                          quick=meta.get("quick"),
                          peak_gflops_reference=torch_results.get("peak_gflops_reference"))
