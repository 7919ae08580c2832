#!/usr/bin/env bash
# The GPU checks as one prepared script, for a session lent a GPU machine (which has CUDA and
# PyTorch but no Rust toolchain):
#
#   tools/device_checks.sh pack   here: builds the CUDA test binaries, the kernels and pixart
#                                 benchmarks and the plugins in release, strips them and packs
#                                 them with the diffusers wheel into .device/kit.tar.xz
#   tools/device_checks.sh run    there, from the tree's root with `.device` carried: runs the
#                                 CUDA tests (every op against the CPU, tensor cores, bf16/f16
#                                 activations, every tiny model end to end, the VRAM cap), then
#                                 tools/bench_gpu.py (PixArt-Σ, a Flux double block and attention
#                                 at L = 4096 beside PyTorch), logs under $OUT
#
# In one device call:  command "tools/device_checks.sh run", carry [".device"], timeout 540.
# The binaries find the fixtures through DITFLOW_REPO and the plugins beside themselves; CUDA's
# libraries are linked under the names cudarc looks for (libnvrtc.so, libcublas.so,
# libcublasLt.so) from wherever the machine has them.
set -euo pipefail
cd "$(dirname "$0")/.."
KIT=.device

pack() {
    rm -rf "$KIT/stage" && mkdir -p "$KIT/stage/release/deps" "$KIT/stage/whl"
    cargo build --release --workspace -q
    local tests
    tests=$(cargo test --release --no-run -p ditflow --test cuda --test cuda_tensor_cores \
        --test cuda_half_activations 2>&1 | sed -n 's/.*Executable .* (\(.*\))/\1/p')
    local benches
    benches=$(cargo bench --no-run -p ditflow --bench kernels --bench pixart 2>&1 |
        sed -n 's/.*Executable .* (\(.*\))/\1/p')
    for exe in $tests $benches; do cp "$exe" "$KIT/stage/release/deps/"; done
    for lib in target/release/libditflow_*.so; do
        case "$lib" in *libditflow_c.so) continue ;; esac
        cp "$lib" "$KIT/stage/release/"
    done
    strip "$KIT"/stage/release/deps/* "$KIT"/stage/release/*.so
    python3 -m pip download -q --no-deps --only-binary=:all: -d "$KIT/stage/whl" diffusers importlib_metadata
    tar -C "$KIT/stage" -cJf "$KIT/kit.tar.xz" .
    rm -rf "$KIT/stage"
    du -h "$KIT/kit.tar.xz"
}

# Links the first file matching NAME.* (searched under the CUDA and Python library folders) as
# NAME in $LIBS, and puts its folder on the library path too (libnvrtc loads its builtins
# from there).
link_lib() {
    local name=$1 found
    found=$(find /usr/local/cuda*/lib64 /usr/lib/x86_64-linux-gnu /opt "$(python3 -c 'import site; print(site.getsitepackages()[0])')" \
        -name "$name*" \( -type f -o -type l \) 2> /dev/null | sort | head -1 || true)
    if [ -n "$found" ]; then
        ln -sf "$found" "$LIBS/$name"
        EXTRA_DIRS="${EXTRA_DIRS:+$EXTRA_DIRS:}$(dirname "$found")"
        echo "$name -> $found"
    else
        echo "$name: not found"
    fi
}

run() {
    local out=${OUT:-/tmp/device-out} work=/tmp/ditflow-kit
    mkdir -p "$out" && rm -rf "$work" && mkdir -p "$work/target"
    tar -C "$work/target" -xJf "$KIT/kit.tar.xz"
    LIBS=$work/libs && mkdir -p "$LIBS"
    EXTRA_DIRS=""
    for lib in libnvrtc.so libcublas.so libcublasLt.so; do link_lib "$lib"; done
    export LD_LIBRARY_PATH="$LIBS${EXTRA_DIRS:+:$EXTRA_DIRS}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export DITFLOW_REPO=$PWD DITFLOW_CACHE_DIR=$work/cache
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt" || true
    local deps=$work/target/release/deps status=0
    for t in cuda cuda_tensor_cores cuda_half_activations; do
        local exe
        exe=$(ls "$deps"/"$t"-* | head -1)
        echo "== $t"
        timeout 240 "$exe" --nocapture --test-threads 1 > "$out/$t.log" 2>&1 || status=1
        grep -E '^test |test result|panicked|relative error|: [0-9.e+-]+$' "$out/$t.log" | tail -40
    done
    python3 -m pip install -q --no-index --no-deps --target "$work/site" "$work"/target/whl/*.whl
    echo "== bench_gpu"
    PYTHONPATH=$work/site PYTHONUNBUFFERED=1 BENCH_DIR=$deps PLUGINS_DIR=$work/target/release \
        timeout 300 python3 tools/bench_gpu.py 2>&1 | tee "$out/bench_gpu.log" || status=1
    return $status
}

case "${1:-}" in
    pack) pack ;;
    run) run ;;
    *) echo "usage: $0 pack|run" >&2; exit 2 ;;
esac
