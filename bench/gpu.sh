#!/usr/bin/env bash
# The GPU check, one command on a bare CUDA machine (Python, a CUDA build of torch, transformers, accelerate, peft;
# no package registry). Gather the wheels first where a registry is reachable: `python3 bench/gpu_wheels.py`
# (-> .whl/), and bring .whl/ along with the checkout. Then, from the repository root:
#
#     bash bench/gpu.sh [RESULTS_DIR]          # default gpu-results/ (git-ignored); ~10 min on one H100
#
# 1. installs the carried wheels into a private folder (pip --target, --no-deps: torch and the image's packages
#    stay as they are),
# 2. prints the stack (torch, CUDA, GPU, bitsandbytes, transformers, peft, accelerate, liger-kernel),
# 3. runs the CUDA-marked tests (tests/test_cuda.py: bitsandbytes' CUDA kernels against peft, bf16 chosen by itself,
#    paged 8-bit AdamW, CUDA peak memory, a GPU run against the same run on the CPU, liger and compile parity),
# 4. runs the demo (configs/tiny.yaml) on the GPU,
# 5. runs bench/throughput.py --gpu (a ~1.1B Llama in NF4 at sequence 2048: scalora, scalora with the GPU levers, a
#    peft loop, the transformers Trainer; tokens/s, peak allocated memory, MFU),
# and writes everything to RESULTS_DIR/gpu-check.json with a table on stdout. Each part runs even if one before
# failed; the exit status is non-zero if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${1:-gpu-results}
PY=${PYTHON:-python3}
SITE=${SCALORA_SITE:-/tmp/scalora-gpu-site}
mkdir -p "$RESULTS"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled PYTHONUNBUFFERED=1
export SCALORA_CACHE="$PWD/$RESULTS/cache"

if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
        || { echo "gpu.sh: installing the carried wheels failed"; exit 2; }
    export PYTHONPATH="$SITE:$PWD"
else
    echo "gpu.sh: no .whl/ here; using the packages already installed (python3 bench/gpu_wheels.py gathers them)"
    export PYTHONPATH="$PWD"
fi

"$PY" - <<'EOF' > "$RESULTS/stack.json"
import importlib.metadata as md, json, torch
names = ["torch", "transformers", "accelerate", "peft", "bitsandbytes", "deepspeed", "liger-kernel", "datasets",
         "trl", "triton", "scalora"]
versions = {}
for n in names:
    try:
        versions[n] = md.version(n)
    except md.PackageNotFoundError:
        versions[n] = None
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
print(json.dumps({"gpu": gpu, "cuda": torch.version.cuda, "versions": versions}, indent=2))
EOF
cat "$RESULTS/stack.json"

status=0
echo "== CUDA tests"
"$PY" -m pytest -m cuda -p no:cacheprovider -rs -q --junitxml="$RESULTS/cuda-tests.xml" tests 2>&1 \
    | tee "$RESULTS/cuda-tests.log" || status=1
echo "== demo on the GPU"
"$PY" -m scalora train configs/tiny.yaml train.output_dir="$RESULTS/demo" train.overwrite=true log.report_to=none \
    2>&1 | tee "$RESULTS/demo.log" || status=1
echo "== throughput, GPU mode"
"$PY" bench/throughput.py --gpu --out-json "$RESULTS/throughput.json" 2>&1 | tee "$RESULTS/throughput.log" \
    || status=1

"$PY" - "$RESULTS" <<'EOF'
import json, os, sys, xml.etree.ElementTree as ET
root = sys.argv[1]
out = {"stack": json.load(open(os.path.join(root, "stack.json")))}
try:
    suite = ET.parse(os.path.join(root, "cuda-tests.xml")).getroot()
    cases = []
    for case in suite.iter("testcase"):
        state = "passed"
        for tag in ("failure", "error", "skipped"):
            if case.find(tag) is not None:
                state = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
        cases.append({"test": f"{case.get('classname')}::{case.get('name')}", "result": state,
                      "seconds": float(case.get("time", 0))})
    out["cuda_tests"] = cases
except (OSError, ET.ParseError) as e:
    out["cuda_tests"] = f"no results: {e}"
try:
    out["demo"] = json.load(open(os.path.join(root, "demo", "summary.json")))
except OSError as e:
    out["demo"] = f"no summary: {e}"
try:
    out["throughput"] = json.load(open(os.path.join(root, "throughput.json")))
except OSError as e:
    out["throughput"] = f"no results: {e}"
json.dump(out, open(os.path.join(root, "gpu-check.json"), "w"), indent=2)
print(f"\n== GPU check: {out['stack']['gpu']} (CUDA {out['stack']['cuda']}, torch {out['stack']['versions']['torch']})")
if isinstance(out["cuda_tests"], list):
    for c in out["cuda_tests"]:
        print(f"  {c['result']:<8} {c['seconds']:7.1f} s  {c['test']}")
if isinstance(out["demo"], dict):
    d = out["demo"]
    print(f"  demo: {d.get('steps')} steps, {d.get('tokens_per_s')} tokens/s, peak {d.get('peak_memory_gb')} GiB, "
          f"compute {d.get('compute_dtype')}, final eval {d.get('final_eval')}")
t = out["throughput"]
if isinstance(t, dict):
    for size, row in t.get("summary", {}).items():
        for stack, r in row.items():
            print(f"  {size} {stack:<13} {r['tokens_per_s']:10.1f} tok/s  peak {r['peak_gb']:.2f} GiB  MFU "
                  f"{r['mfu']:.1%}  vs Trainer {r['vs_trainer']:.2f}x speed, {r['peak_vs_trainer']:.2f}x memory")
    for k, v in t.get("failed", {}).items():
        print(f"  FAILED {k}: {v[-300:]}")
print(f"written: {os.path.join(root, 'gpu-check.json')}")
EOF
exit $status
