# Sourced by the GPU scripts: points Burn's CUDA backend at the driver, NVRTC and the toolkit headers
# (it loads libcuda and libnvrtc at run time and compiles its kernels with NVRTC), and prints them.
PY=${PY:-python3}
if [ -z "${CUDA_PATH:-}" ] && command -v nvcc >/dev/null; then
  CUDA_PATH=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")"); export CUDA_PATH
fi
# libnvrtc: the toolkit's, or the one the image's Python packages carry.
nvrtc_dirs=$($PY -c 'import glob, os, nvidia; print(" ".join(sorted({os.path.dirname(f) for p in nvidia.__path__ for f in glob.glob(p + "/**/libnvrtc.so*", recursive=True)})))' 2>/dev/null)
for d in "${CUDA_PATH:-/usr/local/cuda}/lib64" $nvrtc_dirs; do
  [ -d "$d" ] && LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$d"
done
export LD_LIBRARY_PATH
echo "CUDA_PATH=${CUDA_PATH:-unset}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
for l in libcuda.so libnvrtc.so; do
  echo "$l: $( (ldconfig -p | grep -o "/.*$l[.0-9]*"; for d in ${LD_LIBRARY_PATH//:/ }; do ls "$d"/$l* 2>/dev/null; done) | head -n 2 | tr '\n' ' ')"
done
