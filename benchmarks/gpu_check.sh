#!/usr/bin/env bash
# One prepared run of the GPU-only checks of issue 11, for a machine with one CUDA GPU. Results land in
# ${OUT:-gpu_results}/: the logs and JSON of each step, and all of them in one results.tar.gz.
#
#   bash benchmarks/gpu_check.sh              # the default steps, from the repository root
#   bash benchmarks/gpu_check.sh speed_clip stream  # only these steps (names below)
#
# A lent machine allows 10 minutes a command: run the default steps as two calls, each into its own $OUT,
#   bash benchmarks/gpu_check.sh cuda_tests anchor_kernel window_kernel speed_kernel stream
#   bash benchmarks/gpu_check.sh speed_compiled speed_compiled_large clip_compiled
# and score them together: python benchmarks/goals_report.py FOLDER1 FOLDER2.
#
# Needs torch with CUDA, triton, transformers, safetensors, einops and pytest, not PyAV/OpenCV/soundfile/soxr:
# none of the steps reads or writes media, so the lent GPU machines' stock image runs it as it is.
#
# Steps, run in this order (their names are the log and JSON names): the CUDA-only tests (the Triton kernels
# against the torch code, the kernels inside compiled code, the look-ahead copy); the anchor argmax kernel's
# launch options and its values against SDPA's; the window kernel's programs; where a frame's time goes, eager
# and compiled (profile*, and compiled with the torch window attention, the decoder's blurs as convs or the
# anchor values from SDPA); the renderer per precision and batch size; the 10 s clip eager; the streaming
# latency and cold start; the synthesis layouts on CUDA (channels-last, BatchNorm fold, up-sampling phases)
# with each set of the synthesis network's Triton kernels; the motion encoder's layouts and the decoder's two
# modulated-conv forms (motion_compiled: the encoder compiled); the Triton window-attention kernel forced; the
# torch argmax; parity; torch.compile "reduce-overhead" alone; the clip eager and compiled. Each step has its
# own time limit so that one hang costs only itself; the default steps take about 8.5 minutes on an H200.
# benchmarks/results/ holds the results of earlier runs, one folder per run.
set -uo pipefail
out="${OUT:-gpu_results}"
mkdir -p "$out"
py="${PYTHON:-python3}"
all_steps=(cuda_tests anchor_kernel window_kernel speed_kernel speed_clip stream layout motion speed_torch_argmax parity parity_torch_argmax
           speed_compiled speed_compiled_large clip_compiled profile profile_compiled reference stream_compiled
           speed_window_kernel profile_compiled_torch_window profile_compiled_conv_blur
           profile_compiled_sdpa_values motion_compiled)
# The goals' checks: correctness, the two attention kernels' launch A/Bs, the eager table, streaming, batch 1 /
# 32 / 64 compiled and the 10 s clip (~8.5 minutes on an H200; the profiles and other A/B steps find the next
# lever). benchmarks/goals_report.py then scores every goal from the JSON (goals.txt).
default_steps=(cuda_tests anchor_kernel window_kernel speed_kernel stream speed_compiled speed_compiled_large
               clip_compiled)
steps=("${@:-${default_steps[@]}}")
for name in "${steps[@]}"; do
    [[ " ${all_steps[*]} " == *" $name "* ]] || { echo "unknown step $name; steps: ${all_steps[*]}"; exit 2; }
done
step() {  # step NAME SECONDS COMMAND...
    local name="$1" limit="$2"; shift 2
    [[ " ${steps[*]} " == *" $name "* ]] || return 0
    echo "=== $name ($(date -u +%T))" | tee -a "$out/summary.txt"
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    tail -n 40 "$out/$name.log"
    echo "=== $name: exit $rc" | tee -a "$out/summary.txt"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$out/gpu.txt" 2>&1
"$py" -c "import torch, sys; print(torch.__version__, torch.version.cuda, sys.version.split()[0])" >>"$out/gpu.txt"
# pytest 8 imports the root __init__.py of a package it collects from, and the pack's imports the nodes, which
# need PyAV; so the CUDA tests run from a copy of the core and the tests (they need neither the nodes nor media).
tests_copy="$(mktemp -d)"
cp -r imtalker_core tests "$tests_copy"/
step cuda_tests 150 env -C "$tests_copy" "$py" -m pytest -q -p no:cacheprovider -k "cuda or gpu" \
    tests/test_anchor_argmax_triton.py tests/test_window_attention_triton.py tests/test_speed_paths.py \
    tests/test_render_output.py tests/test_compiled.py tests/test_compiled_kernels.py tests/test_layernorm_triton.py
# The anchor argmax kernel's launch options (tensor-core products, tiles, warps) against the torch code.
step anchor_kernel 90 "$py" benchmarks/anchor_kernel_speed.py --batch-sizes 32 --dtypes fp16 bf16 --block-m 64 128 \
    --block-n 64 128 --warps 4 8
# The window attention kernel's programs (one per window, the default, or per window and head) and its bias (gathered
# in the kernel from the table, the default, or read gathered), at both window levels.
step window_kernel 90 "$py" benchmarks/window_kernel_speed.py --batch-sizes 1 8 32 --dtypes fp16 bf16 \
    --variants auto/table 8/table 8/bias 1/bias 2/table
step profile 60 "$py" benchmarks/profile_renderer.py --device cuda --dtype fp16 --batch-size 32 --batches 4 \
    --json "$out/profile.json"
# "default", not "reduce-overhead": the profiler may see a CUDA graph's replay as one launch, not its kernels.
step profile_compiled 150 "$py" benchmarks/profile_renderer.py --device cuda --dtype fp16 --batch-size 32 \
    --batches 4 --compile default --json "$out/profile_compiled.json"
# The compiled frames step with the torch window attention instead of the kernel (profile_compiled: the kernel).
step profile_compiled_torch_window 150 "$py" benchmarks/profile_renderer.py --device cuda --dtype fp16 \
    --batch-size 32 --batches 4 --compile default --window-kernel torch --json "$out/profile_compiled_torch_window.json"
# The compiled frames step with the motion decoder's blurs as depthwise convs (profile_compiled: shifted sums).
step profile_compiled_conv_blur 150 "$py" benchmarks/profile_renderer.py --device cuda --dtype fp16 \
    --batch-size 32 --batches 4 --compile default --compiled-blur conv --json "$out/profile_compiled_conv_blur.json"
# ... and with the anchor level's values from SDPA instead of the argmax kernel's first pass.
step profile_compiled_sdpa_values 150 "$py" benchmarks/profile_renderer.py --device cuda --dtype fp16 \
    --batch-size 32 --batches 4 --compile default --anchor-values sdpa --json "$out/profile_compiled_sdpa_values.json"
step speed_kernel 120 "$py" benchmarks/speed.py --device cuda --dtypes fp16 bf16 fp32 tf32 --batch-sizes 1 8 32 64 \
    --frames 128 --repeats 2 --paths fast --sections anchor renderer parity --json "$out/speed_kernel.json"
step speed_clip 60 "$py" benchmarks/speed.py --device cuda --dtypes fp16 --batch-sizes 16 32 --frames 64 \
    --paths fast --sections renderer generator audio clip --json "$out/speed_clip.json"
step stream 60 "$py" benchmarks/stream_latency.py --device cuda --batch-size 8 --first-batch-sizes 1 8 \
    --frames 150 --json "$out/stream.json"
step layout 120 "$py" benchmarks/layout_speed.py --device cuda --dtype fp16 --batch-sizes 1 32 --repeats 5 \
    --variants plain both --kernels none window layernorm window+layernorm
step motion 60 "$py" benchmarks/motion_speed.py --device cuda --dtype fp16 --batch-sizes 1 8 32 64
# The motion encoder (driving frames → latents) eager and as the compiled renderer runs it.
step motion_compiled 200 "$py" benchmarks/motion_speed.py --device cuda --dtype fp16 --batch-sizes 8 32 \
    --parts encoder_compiled
# The Triton window-attention kernel (off by default until this says it pays), eager; its parity rows too.
step speed_window_kernel 120 "$py" benchmarks/speed.py --device cuda --dtypes fp16 bf16 fp32 --batch-sizes 1 8 32 \
    --frames 64 --paths fast --window-kernel triton --sections renderer parity --json "$out/speed_window_kernel.json"
step speed_torch_argmax 45 "$py" benchmarks/speed.py --device cuda --dtypes fp16 --batch-sizes 1 8 32 \
    --frames 64 --paths fast --argmax-kernel torch --sections renderer --json "$out/speed_torch_argmax.json"
step parity 45 "$py" benchmarks/speed.py --device cuda --dtypes fp32 fp16 bf16 --sections parity \
    --json "$out/parity.json"
# The anchor picks that half precision changes with the torch argmax (speed_kernel's parity rows: the kernel's).
step parity_torch_argmax 45 "$py" benchmarks/speed.py --device cuda --dtypes fp16 bf16 --argmax-kernel torch \
    --sections parity --json "$out/parity_torch_argmax.json"
step speed_compiled 170 "$py" benchmarks/speed.py --device cuda --dtypes fp16 --batch-sizes 1 32 --frames 64 \
    --paths fast compiled --compile-mode reduce-overhead --sections renderer --json "$out/speed_compiled.json"
step speed_compiled_large 150 "$py" benchmarks/speed.py --device cuda --dtypes fp16 --batch-sizes 64 --frames 128 \
    --paths compiled --compile-mode reduce-overhead --sections renderer --json "$out/speed_compiled_large.json"
step clip_compiled 200 "$py" benchmarks/speed.py --device cuda --dtypes fp16 --batch-sizes 32 --paths fast compiled \
    --compile-mode reduce-overhead --sections clip --json "$out/clip_compiled.json"
step stream_compiled 200 "$py" benchmarks/stream_latency.py --device cuda --batch-size 8 --first-batch-sizes 1 \
    --frames 150 --audio-modes whole --no-compare --compile reduce-overhead --json "$out/stream_compiled.json"
# The reference's own loop on the GPU, same process and weights: REFERENCE_DIR is a checkout of
# github.com/bigai-nlco/IMTalker (the GPU machine reaches no network: carry one in an ignored folder).
step reference 120 "$py" benchmarks/speed.py --device cuda --dtypes fp32 fp16 --batch-sizes 1 8 32 --frames 32 \
    --paths fast --sections renderer reference --reference "${REFERENCE_DIR:-REFERENCE_DIR-not-set}" \
    --json "$out/reference.json"
cat "$out/summary.txt"
"$py" benchmarks/goals_report.py "$out" --json "$out/goals.json" | tee "$out/goals.txt"
archive="$(mktemp)"  # outside $out: an archive written into the folder it reads changes under tar
tar -czf "$archive" -C "$out" --exclude results.tar.gz . && mv "$archive" "$out/results.tar.gz"
