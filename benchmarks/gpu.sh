#!/usr/bin/env bash
# The GPU checks as one short script (a few minutes on one H200): the engine's speed and its
# agreement with the one-sample loop on CUDA for a CNN, a ResNet, a ViT and an LSTM; bf16 score
# errors; scoring throughput with --amp / --channels-last; an end-to-end run on CUDA.
#
#   benchmarks/gpu.sh [OUTDIR]     (default gpu-results; one .txt per step)
#
# Needs torch with CUDA and scikit-learn (digits); the package from this checkout (src/).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu-results}
mkdir -p "$out"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
status=0
step() { # name, command...
    local name=$1
    shift
    echo "== $name ($(date -u +%T))"
    "$@" 2>&1 | tee "$out/$name.txt" || status=1
}
step env $py -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))"
for model in smallcnn resnet18-cifar vit-small-cifar lstm-text; do
    step "scoring-$model" $py benchmarks/scoring.py --model "$model" --device cuda --no-memory
done
# a recurrent layer the engine does not batch (proj_size) takes the exact fallback: on CUDA too
step lstm-fallback $py - <<'EOF'
import warnings, torch
from torch import nn
from gradnorm_al.pergrad import per_sample_grad_norms, per_sample_grad_norms_loop
from gradnorm_al.strategies import entropy_loss
class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(8, 16, proj_size=4, batch_first=True)
        self.fc = nn.Linear(4, 3)
    def forward(self, x):
        return self.fc(self.rnn(x)[0][:, -1])
torch.manual_seed(0)
dev = "cuda" if torch.cuda.is_available() else "cpu"
m, x = M().to(dev).double(), torch.randn(6, 5, 8, device=dev, dtype=torch.float64)
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    ours = per_sample_grad_norms(m, x, entropy_loss, chunk_size=4)
ref = per_sample_grad_norms_loop(m, x, entropy_loss)
rel = ((ours - ref).norm() / ref.norm()).item()
print(f"LSTM(proj_size=4) on {dev}, float64: engine ({len(w)} warning(s)) vs loop: rel L2 {rel:.2e}")
assert rel < 1e-9
EOF
step amp-scores $py benchmarks/amp_scores.py --device cuda
for flags in "" "--amp bf16" "--channels-last"; do
    # shellcheck disable=SC2086
    step "distributed-resnet18${flags// /}" $py benchmarks/distributed_scoring.py \
        --model resnet18-cifar --device cuda $flags
done
cat >"$out/run.yaml" <<'EOF'
dataset: digits
model: smallcnn
strategies: [entropy-gradnorm, badge, random]
trials: 1
cycles: 3
epochs: 5
batch_size: 32
device: cuda
amp: bf16
EOF
rm -rf "$out/run"
step run-cuda $py -m gradnorm_al run --config "$out/run.yaml" --out "$out/run"
exit $status
