//! `--device cpu|cuda[:N]` parsing and dispatch to a backend type, shared by the commands.

use anyhow::bail;

/// A parsed `--device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    /// The CPU backend (Flex).
    Cpu,
    /// CUDA device `N`.
    Cuda(usize),
}

/// Parses `cpu`, `cuda` or `cuda:N`.
pub fn parse(s: &str) -> anyhow::Result<Device> {
    Ok(match s {
        "cpu" => Device::Cpu,
        "cuda" => Device::Cuda(0),
        _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) => Device::Cuda(i),
            _ => bail!("--device {s:?}: use cpu, cuda or cuda:N"),
        },
    })
}

/// The error for `--device cuda` in a build without the `cuda` feature.
#[cfg_attr(feature = "cuda", allow(dead_code))]
pub fn no_cuda(s: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "--device {s}: this build has no CUDA support; rebuild with `--features cuda` (needs the CUDA toolkit)"
    )
}

/// Runs `$cpu` on the CPU, or binds `$dev` to the CUDA device and runs `$cuda` (in a build with the
/// `cuda` feature; otherwise returns the "no CUDA support" error).
#[macro_export]
macro_rules! on_device {
    ($spec:expr, cpu => $cpu:expr, cuda($dev:ident) => $cuda:expr $(,)?) => {
        match $crate::device::parse($spec)? {
            $crate::device::Device::Cpu => $cpu,
            #[cfg(feature = "cuda")]
            $crate::device::Device::Cuda(i) => {
                let $dev = burn::backend::cuda::CudaDevice::new(i);
                $cuda
            }
            #[cfg(not(feature = "cuda"))]
            $crate::device::Device::Cuda(_) => return Err($crate::device::no_cuda($spec)),
        }
    };
}

/// Waits until `dev` has finished all queued work (for timing).
pub fn sync<B: burn::tensor::backend::Backend>(dev: &B::Device) -> anyhow::Result<()> {
    B::sync(dev).map_err(|e| anyhow::anyhow!("device sync failed: {e:?}"))
}
