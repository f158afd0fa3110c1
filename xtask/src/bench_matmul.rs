//! `cargo xtask bench-matmul`: the backend's matrix-product rate (GFLOP/s) for given shapes, on the
//! CPU or a CUDA device, in f32 or bf16. The default shapes are a square product and the three
//! kinds of product a LoRA step of Qwen2.5-7B runs at batch 4 x 384: a projection `x·Wᵀ` with the
//! weight stored `[out, in]`, its input gradient `dy·W`, and the rank-8 LoRA A product.

use std::time::Instant;

use anyhow::{bail, Context};
use burn::backend::Flex;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Distribution, Tensor};

/// Arguments of `bench-matmul`.
#[derive(clap::Args, Debug)]
pub struct BenchMatmulArgs {
    /// cpu | cuda[:N]
    #[arg(long, default_value = "cpu")]
    device: String,
    /// f32 | bf16
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Products as MxKxN (lhs [M, K] times rhs [K, N]); a trailing `t` stores the rhs as [N, K]
    /// and multiplies by its transpose, as a linear layer does with its weight.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "2048x2048x2048,1536x3584x18944t,1536x18944x3584,1536x3584x8t"
    )]
    shapes: Vec<String>,
    /// Timed products per shape (after two warm-up products).
    #[arg(long, default_value_t = 10)]
    reps: usize,
}

struct Shape {
    m: usize,
    k: usize,
    n: usize,
    rhs_transposed: bool,
}

fn parse_shape(s: &str) -> anyhow::Result<Shape> {
    let (dims, rhs_transposed) = match s.strip_suffix('t') {
        Some(d) => (d, true),
        None => (s, false),
    };
    let v: Vec<usize> = dims
        .split('x')
        .map(str::parse)
        .collect::<Result<_, _>>()
        .with_context(|| format!("--shapes {s:?}: use MxKxN, e.g. 1536x3584x18944t"))?;
    match v[..] {
        [m, k, n] if m > 0 && k > 0 && n > 0 => Ok(Shape {
            m,
            k,
            n,
            rhs_transposed,
        }),
        _ => bail!("--shapes {s:?}: use MxKxN with three positive sizes"),
    }
}

pub fn run(a: BenchMatmulArgs) -> anyhow::Result<()> {
    let dtype = match a.dtype.as_str() {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        d => bail!("--dtype {d:?}: use f32 or bf16"),
    };
    let shapes = a
        .shapes
        .iter()
        .map(|s| parse_shape(s))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let spec = a.device.clone();
    crate::on_device!(&spec,
        cpu => run_on::<Flex>(&a, &shapes, &Default::default(), dtype),
        cuda(dev) => run_on::<burn::backend::Cuda>(&a, &shapes, &dev, dtype),
    )
}

fn run_on<B: Backend>(
    a: &BenchMatmulArgs,
    shapes: &[Shape],
    dev: &B::Device,
    dtype: DType,
) -> anyhow::Result<()> {
    for s in shapes {
        let rand = |dims: [usize; 2]| {
            Tensor::<B, 2>::random(dims, Distribution::Uniform(-1.0, 1.0), dev).cast(dtype)
        };
        let x = rand([s.m, s.k]);
        let w = if s.rhs_transposed {
            rand([s.n, s.k])
        } else {
            rand([s.k, s.n])
        };
        let product = || {
            if s.rhs_transposed {
                x.clone().matmul(w.clone().transpose())
            } else {
                x.clone().matmul(w.clone())
            }
        };
        for _ in 0..2 {
            drop(product());
        }
        crate::device::sync::<B>(dev)?;
        let t0 = Instant::now();
        for _ in 0..a.reps {
            drop(product());
        }
        crate::device::sync::<B>(dev)?;
        let dt = t0.elapsed().as_secs_f64() / a.reps as f64;
        let gflops = 2.0 * (s.m * s.k * s.n) as f64 / dt / 1e9;
        outln!(
            "{}",
            serde_json::json!({
                "impl": format!("burn-{}", B::name(dev)), "device": a.device, "dtype": a.dtype,
                "m": s.m, "k": s.k, "n": s.n, "rhs_transposed": s.rhs_transposed,
                "ms": (dt * 1e6).round() / 1e3, "gflops": gflops.round(),
            })
        );
    }
    Ok(())
}
