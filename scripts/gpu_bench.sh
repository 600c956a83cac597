#!/bin/bash
# One measurement run on a GPU machine (the H100 of issue 5), results and logs in $OUT (at most 8
# files: run.log and the JSONs). Parts, in the order given (default: check llava qwen):
#   check  the CPU tests of the fast preprocessing and M-RoPE on this machine's transformers, and scripts/gpu_check.py
#          (the kernels against their torch references, the device's ceilings)
#   llava  LLaVA-1.5-7B shape, 336x336 images: bench latency, bench throughput (beside HF), profile
#   qwen   Qwen2-VL-7B shape, 1024x1024 images: the same
#   alternatives   scripts/gpu_alternatives.py: the alternatives to the attention kernels, the GEMVs and the
#                  CPU preprocessing, measured beside them
#   gpu_tests      the pytest files with GPU-only tests
#   vision_sweep   scripts/gpu_vision_attention_sweep.py: the Triton vision attention's variants and tiles
#                  (VSWEEP_CONFIGS: its --configs)
#   check_sweep    scripts/gpu_check.py with the tile-size sweeps (--sweep)
#   last_wave      scripts/gpu_last_wave_probe.py: the vision attention's last wave cut into pieces or not
#                  (beside $BEFORE's kernel where given)
#   {llava,qwen}_{latency,throughput,profile,trace}
#                  one figure of one model (trace: scripts/gpu_step_trace.py, the throughput run step by step)
#                  (TRACE_STEP=0: the trace profiles the first prefill step, host ops included; TRACE_TOP: rows of
#                  its kernel tables)
#   {llava,qwen}_sync  latency and throughput (vlmserve only) with async scheduling off (VLMSERVE_ASYNC_SCHEDULING=0)
#   {llava,qwen}_vlm   throughput, vlmserve only (A/B of SEQS or env settings)
#   {llava,qwen}_noprefetch  latency with the encoder prefetch off (VLMSERVE_ENCODER_PREFETCH=0; on by default)
#   gemv_ab        bench latency of both models, the Triton GEMV against cuBLAS (VLMSERVE_TRITON_GEMV=0)
#   pdl_ab         bench latency of both models, programmatic dependent launch on and off (VLMSERVE_PDL=0)
#   rotary_ab      bench latency of both models, rotary inside the KV store's kernel on/off
#   variants       bench latency of VARIANT_MODELS (llava qwen) under each setting of VARIANTS
#                  ("name:VAR=V,VAR=V;name:-" , - for none; TREE=path runs the tree there, as $BEFORE below),
#                  AB_ROUNDS rounds, all rows in variants.jsonl (VARIANT_LAT: the bench's iteration options)
#   gemv_sweep     scripts/gpu_gemv_sweep.py: the GEMV's tiles in decode chains against cuBLAS
#   gemv_shapes    scripts/gpu_gemv_shapes.py: each decode GEMV shape apart, tiles and fused work
#   decode_single  gpu_check.py --single: the decode attention at single-stream shapes, splits x tiles
#   {llava,qwen}_vattn     latency and throughput (vlmserve only) with the Triton vision attention
#                          (VLMSERVE_TRITON_VISION_ATTENTION=1)
# The figures of BENCHMARKS.md's table in one call (~6.5 min on an H200):
#   llava_latency qwen_latency llava_throughput qwen_throughput check gpu_tests
#   ttft_timeline  scripts/gpu_ttft_timeline.py: where a lone request's TTFT goes, host and device side by side
#   preprocess     scripts/gpu_preprocess_profile.py, LLaVA and Qwen2-VL images
#   async_test     tests/test_async_scheduling.py alone
#   {llava,qwen}_async scripts/gpu_async_trace.py: the host's launch and wait times, syncs in launches (ASYNC_N;
#                      ASYNC_ARGS: more options, e.g. "--watch-syncs 0 --step-gaps 1")
#   llava_ab       LLaVA throughput, vlmserve only, media processed serially vs in the pipeline
#   llava_profile  the LLaVA profile alone
#   fastpath       issue 5's fast path, LLaVA: profiles now (encoder graphs checked against eager) and
#                  with the tree in $BEFORE (a copy of the base commit's vlmserve/ and scripts/), bench
#                  latency likewise, then gpu_check.py
#   latency_ab     bench latency now and with $BEFORE, alternating (AB_ROUNDS, LAT_ITERS)
#   before_latency bench latency of both models with $BEFORE (beside the latency parts of this tree)
#   (the $BEFORE runs start in $BEFORE: `python -m` puts the working directory first on sys.path, ahead
#   of PYTHONPATH, so from here they would import this tree's vlmserve)
#   OUT=/tmp/out COMMIT=<hash> [COPY_TO=$OUT_of_the_device_tool] bash scripts/gpu_bench.sh [parts...]
# (COMMIT: the hash written out here; the device copy's .git can be stale, so git rev-parse there may name an
# older commit than the tree it runs)
# Sizes: LLAVA_N (500 requests), LLAVA_HFB (HF batch sizes, 192,256), QWEN_N (128), QWEN_HFB (64,96),
# SEQS (max_num_seqs, 256: the engine's default; the H200's KV cache holds that many of these requests).
# Each step runs under its own time limit (seconds, T_* below).
set -o pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_bench}
mkdir -p "$OUT"
LOG="$OUT/run.log"
LLAVA_N=${LLAVA_N:-500}; LLAVA_HFB=${LLAVA_HFB:-192,256}; QWEN_N=${QWEN_N:-128}; QWEN_HFB=${QWEN_HFB:-64,96}
SEQS=${SEQS:-256}
# bench latency of the table: TTFT over 20 requests (each new prompt and image), the whole generation over 5,
# two warm-ups of each (Qwen2-VL's encoder graph for an image layout is captured the second time it is met)
LAT_ARGS=${LAT_ARGS:-"--num-iters 5 --num-iters-ttft 20 --num-iters-warmup 2"}
PARTS=${*:-check llava qwen}
BENCH="python -m vlmserve.entrypoints.cli bench"

latency_env_ab() {  # latency_env_ab TAG VAR...: bench latency of both models with each VAR=1 and each VAR=0,
    # alternating, AB_ROUNDS times
    local tag=$1 r model shape image v var
    shift
    for r in $(seq "${AB_ROUNDS:-1}"); do
        for model in llava qwen; do
            if [ "$model" = llava ]; then shape=llava-1.5-7b; image=336x336; else shape=qwen2-vl-7b; image=1024x1024; fi
            for v in 1 0; do
                step "${model}_latency_${tag}${v}_r$r" "${T_LAT:-110}" env $(for var in "$@"; do echo "$var=$v"; done) \
                    $BENCH latency --random-model \
                    --model-shape $shape --input-len 32 --output-len 128 --source-image-size $image --backends vlmserve \
                    --num-iters 5 --num-iters-warmup 1 --output-json "$OUT/${model}_${tag}${v}_r$r.json"
            done
        done
    done
}

step() {  # step NAME LIMIT_S CMD...: run under a time limit, output to the log
    local name=$1 limit=$2
    shift 2
    echo "== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*" | tee -a "$LOG"
    timeout "$limit" "$@" 2>&1 | grep -v "Warning\|warn(\|Loading weights\|profiler_st" | tee -a "$LOG"
    echo "== $name: exit ${PIPESTATUS[0]} ($(date -u +%H:%M:%S))" | tee -a "$LOG"
    # COPY_TO (the device tool's $OUT, where at most 8 files come back): the log and the JSONs so far,
    # after every step, so that a call cut off by its time limit still returns what it finished
    if [ -n "$COPY_TO" ]; then cp "$LOG" "$OUT"/*.json "$OUT"/*.jsonl "$COPY_TO"/ 2>/dev/null; fi
}

model_run() {  # model_run TAG SHAPE IMAGE N HFB
    local tag=$1 shape=$2 image=$3 n=$4 hfb=$5
    local m="--random-model --model-shape $shape --input-len 32 --output-len 128 --source-image-size $image"
    step "${tag}_latency" "${T_LAT:-110}" $BENCH latency $m --backends vlmserve --num-iters 5 --num-iters-warmup 1 \
        --output-json "$OUT/${tag}_latency.json"
    step "${tag}_throughput" "${T_TPUT:-240}" $BENCH throughput $m --num-prompts "$n" --backends vlmserve,hf \
        --hf-batch-size "$hfb" --max-num-seqs "$SEQS" --output-json "$OUT/${tag}_throughput.json"
    step "${tag}_profile" "${T_PROF:-90}" python scripts/gpu_profile.py --model-shape "$shape" --image-size "$image" \
        --out "$OUT/${tag}_profile.json"
}

env_ab() {  # env_ab TAG SUFFIX VAR=VALUE: latency and throughput (vlmserve only) of model TAG with a setting
    local tag=$1 suffix=$2 setting=$3 shape image n
    if [ "$tag" = llava ]; then shape=llava-1.5-7b; image=336x336; n=$LLAVA_N
    else shape=qwen2-vl-7b; image=1024x1024; n=$QWEN_N; fi
    local m="--random-model --model-shape $shape --input-len 32 --output-len 128 --source-image-size $image"
    step "${tag}_latency_$suffix" "${T_LAT:-110}" env "$setting" $BENCH latency $m \
        --backends vlmserve --num-iters 5 --num-iters-warmup 1 --output-json "$OUT/${tag}_latency_$suffix.json"
    step "${tag}_throughput_$suffix" "${T_TPUT:-240}" env "$setting" $BENCH throughput $m \
        --num-prompts "$n" --backends vlmserve --max-num-seqs "$SEQS" --output-json "$OUT/${tag}_throughput_$suffix.json"
}

# Python packages the GPU image lacks (blake3) go with the tree as wheels in .device_wheels/ (an
# ignored folder: name it in the device tool's `carry`), fetched here with
#   pip download blake3 --no-deps --only-binary=:all: --python-version 3.12 \
#       --platform manylinux_2_17_x86_64 -d .device_wheels
if ! python -c "import blake3" 2>/dev/null; then
    python -m pip install -q --no-deps .device_wheels/*.whl || { echo "blake3 is missing: carry .device_wheels" | tee -a "$LOG"; exit 3; }
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee -a "$LOG"
python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$LOG"
echo "commit ${COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)} (+ the tree as copied)" | tee -a "$LOG"
for part in $PARTS; do
    case $part in
        check)
            step cpu_tests 90 python -m pytest -q -p no:cacheprovider tests/test_clip_image_processing.py \
                tests/test_mrope_lookup.py
            step gpu_check "${T_CHECK:-150}" python scripts/gpu_check.py --out "$OUT/gpu_check.json" ;;
        alternatives)  # attention, GEMV and preprocessing alternatives against what runs now
            step alternatives "${T_ALT:-240}" python scripts/gpu_alternatives.py --out "$OUT/alternatives.json" \
                ${ALT_PARTS:+--parts "$ALT_PARTS"} ;;
        gpu_tests)  # the tests that need a GPU (FlashAttention prefill, GPU preprocessing, CUDA graphs)
            step gpu_tests "${T_TESTS:-300}" python -m pytest -q -p no:cacheprovider tests/test_fresh_prefill.py \
                tests/test_device_pixels.py tests/test_prefill_graphs.py tests/test_encoder_graphs.py \
                tests/test_async_scheduling.py tests/test_encoder_prefetch.py tests/test_kernel_warmup.py \
                tests/test_triton_gemv.py tests/test_pdl.py tests/test_engine_heap.py tests/test_device_utils.py ;;
        vision_sweep)  # the Triton vision attention's variants and tiles, each in its own process
            step vision_sweep "${T_VSWEEP:-400}" python scripts/gpu_vision_attention_sweep.py \
                --out "$OUT/vision_sweep.json" ${VSWEEP_CONFIGS:+--configs "$VSWEEP_CONFIGS"} ;;
        last_wave)  # the vision attention's last wave: cuts planned and forced, beside $BEFORE's kernel
            step last_wave "${T_LWAVE:-300}" python scripts/gpu_last_wave_probe.py --out "$OUT/last_wave.json" \
                ${BEFORE:+--before "$BEFORE"} ;;
        check_sweep)  # the kernel checks, plus tile-size sweeps of the decode attention and GEMV kernels
            step gpu_check "${T_CHECK:-240}" python scripts/gpu_check.py --sweep --out "$OUT/gpu_check.json" ;;
        llava_latency|qwen_latency|llava_throughput|qwen_throughput|llava_profile|qwen_profile|llava_trace|qwen_trace)
            # one figure of one model: latency, throughput (beside HF), profile, or step trace
            tag=${part%%_*}; what=${part#*_}
            if [ "$tag" = llava ]; then shape=llava-1.5-7b; image=336x336; n=$LLAVA_N; hfb=$LLAVA_HFB
            else shape=qwen2-vl-7b; image=1024x1024; n=$QWEN_N; hfb=$QWEN_HFB; fi
            m="--random-model --model-shape $shape --input-len 32 --output-len 128 --source-image-size $image"
            case $what in
                latency) step "$part" "${T_LAT:-110}" $BENCH latency $m --backends vlmserve $LAT_ARGS \
                    --output-json "$OUT/$part.json" ;;
                throughput) step "$part" "${T_TPUT:-240}" $BENCH throughput $m --num-prompts "$n" \
                    --backends vlmserve,hf --hf-batch-size "$hfb" --max-num-seqs "$SEQS" --output-json "$OUT/$part.json" ;;
                profile) step "$part" "${T_PROF:-90}" python scripts/gpu_profile.py --model-shape "$shape" \
                    --image-size "$image" --out "$OUT/$part.json" ;;
                trace) step "$part" "${T_TRACE:-120}" python scripts/gpu_step_trace.py --model-shape "$shape" \
                    --image-size "$image" --num-prompts "$n" --max-num-seqs "$SEQS" --out "$OUT/$part.json" \
                    ${TRACE_STEP:+--profile-prefill-step "$TRACE_STEP"} ${TRACE_TOP:+--top-kernels "$TRACE_TOP"} ;;
            esac ;;
        llava_noprefetch|qwen_noprefetch)  # bench latency with the encoder prefetch off (VLMSERVE_ENCODER_PREFETCH=0)
            tag=${part%%_*}
            if [ "$tag" = llava ]; then shape=llava-1.5-7b; image=336x336; else shape=qwen2-vl-7b; image=1024x1024; fi
            step "${tag}_latency_noprefetch" "${T_LAT:-110}" env VLMSERVE_ENCODER_PREFETCH=0 $BENCH latency \
                --random-model --model-shape $shape --input-len 32 --output-len 128 --source-image-size $image \
                --backends vlmserve --num-iters 5 --num-iters-warmup 1 --output-json "$OUT/${tag}_latency_noprefetch.json" ;;
        llava_vattn|qwen_vattn)  # latency and throughput (vlmserve only) with the Triton vision attention
            env_ab "${part%%_*}" vattn VLMSERVE_TRITON_VISION_ATTENTION=1 ;;
        gemv_ab)  # single-stream decode, both models: the Triton GEMV (the default on sm_90+) against cuBLAS
            latency_env_ab gemv VLMSERVE_TRITON_GEMV ;;
        pdl_ab)  # the same with programmatic dependent launch on (the default on sm_90+) and off (VLMSERVE_PDL=0)
            latency_env_ab pdl VLMSERVE_PDL ;;
        rotary_ab)  # the same with rotary inside the KV store's kernel (the default) and in its own
            # (VLMSERVE_ROTARY_IN_KV_STORE=0)
            latency_env_ab rotary VLMSERVE_ROTARY_IN_KV_STORE ;;
        variants)
            IFS=';' read -ra settings <<< "${VARIANTS:-base:-}"
            for r in $(seq "${AB_ROUNDS:-1}"); do
                for model in ${VARIANT_MODELS:-llava qwen}; do
                    if [ "$model" = llava ]; then shape=llava-1.5-7b; image=336x336; else shape=qwen2-vl-7b; image=1024x1024; fi
                    for setting in "${settings[@]}"; do
                        name=${setting%%:*}; vars=${setting#*:}; [ "$vars" = - ] && vars=
                        tree=$PWD
                        for v in ${vars//,/ }; do [ "${v%%=*}" = TREE ] && tree=$(realpath "${v#*=}"); done
                        step "${model}_latency_${name}_r$r" "${T_LAT:-110}" env -C "$tree" PYTHONPATH="$tree" ${vars//,/ } \
                            $BENCH latency --random-model \
                            --model-shape $shape --input-len 32 --output-len 128 --source-image-size $image \
                            --backends vlmserve ${VARIANT_LAT:---num-iters ${LAT_ITERS:-5} --num-iters-warmup 1} \
                            --output-json "$OUT/one.json"
                        python -c "import json, sys; d = json.load(open(sys.argv[1])); print(json.dumps(
                            {'model': sys.argv[2], 'variant': sys.argv[3], 'round': sys.argv[4], 'settings': sys.argv[5],
                             'result': d}))" "$OUT/one.json" "$model" "$name" "$r" "$vars" >> "$OUT/variants.jsonl"
                        rm -f "$OUT/one.json" "${COPY_TO:-/nonexistent}/one.json"
                        # (step copied before this row was added: copy again, or a call's last row stays behind)
                        if [ -n "$COPY_TO" ]; then cp "$OUT/variants.jsonl" "$COPY_TO"/; fi
                    done
                done
            done ;;
        gemv_shapes)  # scripts/gpu_gemv_shapes.py: each decode GEMV shape apart, over tiles and with fused work
            step gemv_shapes "${T_GSHAPES:-200}" python scripts/gpu_gemv_shapes.py --out "$OUT/gemv_shapes.json" ;;
        decode_single)  # gpu_check.py --single: the decode attention kernel at single-stream shapes, splits x tiles
            step decode_single "${T_DSINGLE:-150}" python scripts/gpu_check.py --single ;;
        gemv_sweep)  # scripts/gpu_gemv_sweep.py: decode GEMV chains in a graph, cuBLAS against the Triton GEMV's tiles
            step gemv_sweep "${T_GSWEEP:-200}" python scripts/gpu_gemv_sweep.py --out "$OUT/gemv_sweep.json" ;;
        llava_sync|qwen_sync)  # A/B: latency and throughput (vlmserve only) with async scheduling off
            env_ab "${part%%_*}" sync VLMSERVE_ASYNC_SCHEDULING=0 ;;
        llava_async|qwen_async)  # scripts/gpu_async_trace.py: launch/collect times and the syncs in launches
            tag=${part%%_*}
            if [ "$tag" = llava ]; then shape=llava-1.5-7b; image=336x336; n=${ASYNC_N:-300}
            else shape=qwen2-vl-7b; image=1024x1024; n=${ASYNC_N:-96}; fi
            step "$part" "${T_TRACE:-150}" python scripts/gpu_async_trace.py --model-shape "$shape" --image-size "$image" \
                --num-prompts "$n" --max-num-seqs "$SEQS" --out "$OUT/$part.json" $ASYNC_ARGS ;;
        llava_vlm|qwen_vlm)  # throughput, vlmserve only (for A/B of engine settings: SEQS, env)
            tag=${part%%_*}
            if [ "$tag" = llava ]; then shape=llava-1.5-7b; image=336x336; n=$LLAVA_N
            else shape=qwen2-vl-7b; image=1024x1024; n=$QWEN_N; fi
            step "$part" "${T_TPUT:-240}" $BENCH throughput --random-model --model-shape $shape --input-len 32 \
                --output-len 128 --source-image-size $image --num-prompts "$n" --backends vlmserve \
                --max-num-seqs "$SEQS" --output-json "$OUT/${part}_seqs$SEQS.json" ;;
        preprocess)  # scripts/gpu_preprocess_profile.py: the host time of one image's preprocessing
            step preprocess_llava 60 python scripts/gpu_preprocess_profile.py --model-shape llava-1.5-7b \
                --image-size 336x336 --out "$OUT/preprocess_llava.json"
            step preprocess_qwen 60 python scripts/gpu_preprocess_profile.py --model-shape qwen2-vl-7b \
                --image-size 1024x1024 --out "$OUT/preprocess_qwen.json" ;;
        async_test)  # the GPU test of async scheduling alone
            step async_test 120 python -m pytest -q -p no:cacheprovider tests/test_async_scheduling.py ;;
        llava) model_run llava llava-1.5-7b 336x336 "$LLAVA_N" "$LLAVA_HFB" ;;
        qwen) model_run qwen qwen2-vl-7b 1024x1024 "$QWEN_N" "$QWEN_HFB" ;;
        llava_ab)  # the media pipeline against serial processing (VLMSERVE_MEDIA_WORKERS=0), vlmserve only
            m="--random-model --model-shape llava-1.5-7b --input-len 32 --output-len 128 --source-image-size 336x336"
            for w in 0 7; do
                export VLMSERVE_MEDIA_WORKERS=$w
                step "llava_ab_workers$w" "${T_TPUT:-240}" $BENCH throughput $m \
                    --num-prompts "$LLAVA_N" --backends vlmserve --max-num-seqs "$SEQS" --output-json "$OUT/llava_ab_workers$w.json"
            done
            unset VLMSERVE_MEDIA_WORKERS ;;
        fastpath)
            m="--random-model --model-shape llava-1.5-7b --input-len 32 --output-len 128 --source-image-size 336x336"
            lat="--backends vlmserve --num-iters ${LAT_ITERS:-3} --num-iters-warmup 1"
            step after_profile "${T_PROF:-90}" python scripts/gpu_profile.py --model-shape llava-1.5-7b \
                --image-size 336x336 --out "$OUT/after_profile.json"
            step before_profile "${T_PROF:-90}" env PYTHONPATH="$BEFORE" python "$BEFORE/scripts/gpu_profile.py" \
                --model-shape llava-1.5-7b --image-size 336x336 --out "$OUT/before_profile.json"
            step after_latency "${T_LAT:-110}" $BENCH latency $m $lat --output-json "$OUT/after_latency.json"
            step before_latency "${T_LAT:-110}" env -C "$BEFORE" PYTHONPATH="$BEFORE" $BENCH latency $m $lat \
                --output-json "$OUT/before_latency.json"
            step gpu_check "${T_CHECK:-150}" python scripts/gpu_check.py --out "$OUT/gpu_check.json" ;;
        latency_ab)  # bench latency now and with the tree in $BEFORE, alternating, AB_ROUNDS rounds (the GPU's idle clocks make TTFT noisy)
            m="--random-model --model-shape llava-1.5-7b --input-len 32 --output-len 128 --source-image-size 336x336"
            lat="--backends vlmserve --num-iters ${LAT_ITERS:-5} --num-iters-warmup 1"
            for r in $(seq "${AB_ROUNDS:-2}"); do
                step "after_latency$r" "${T_LAT:-110}" $BENCH latency $m $lat --output-json "$OUT/after_latency$r.json"
                step "before_latency$r" "${T_LAT:-110}" env -C "$BEFORE" PYTHONPATH="$BEFORE" $BENCH latency $m $lat \
                    --output-json "$OUT/before_latency$r.json"
            done ;;
        before_latency)  # bench latency of both models with the tree in $BEFORE (the table's latency parts are the after)
            lat="--backends vlmserve $LAT_ARGS"
            for tag in llava qwen; do
                if [ "$tag" = llava ]; then shape=llava-1.5-7b; image=336x336; else shape=qwen2-vl-7b; image=1024x1024; fi
                step "before_${tag}_latency" "${T_LAT:-110}" env -C "$BEFORE" PYTHONPATH="$BEFORE" $BENCH latency \
                    --random-model --model-shape $shape --input-len 32 --output-len 128 --source-image-size $image $lat \
                    --output-json "$OUT/before_${tag}_latency.json"
            done ;;
        ttft_timeline)  # scripts/gpu_ttft_timeline.py: a lone request's TTFT, host and device marks side by side,
            # TL_MODELS (llava qwen), and of the tree in $BEFORE where given (its vlmserve, this tree's script);
            # TL_ARGS: more of the script's options (--fine, --cprofile N)
            for tag in ${TL_MODELS:-llava qwen}; do
                if [ "$tag" = llava ]; then shape=llava-1.5-7b; image=336x336; else shape=qwen2-vl-7b; image=1024x1024; fi
                step "ttft_timeline_$tag" "${T_TL:-120}" python scripts/gpu_ttft_timeline.py --model-shape $shape \
                    --image-size $image $TL_ARGS --out "$OUT/ttft_timeline_$tag.json"
                if [ -n "$BEFORE" ]; then
                    step "before_ttft_timeline_$tag" "${T_TL:-120}" env PYTHONPATH="$BEFORE" python \
                        scripts/gpu_ttft_timeline.py --model-shape $shape --image-size $image $TL_ARGS \
                        --out "$OUT/before_ttft_timeline_$tag.json"
                fi
            done ;;
        llava_profile) step llava_profile "${T_PROF:-90}" python scripts/gpu_profile.py --model-shape llava-1.5-7b \
                --image-size 336x336 --out "$OUT/llava_profile.json" ;;
        *) echo "unknown part $part" | tee -a "$LOG" ;;
    esac
done
