//! The cost of the single tensor operations the engine's steps are made of, on 4 M f32 values
//! (16 MB), to read the pass table of `docs/benchmarks.md` in time: which operations are cheap,
//! which cost more than their passes suggest.
//!
//! ```text
//! cargo bench -p burn-sam-sample --bench ops --no-default-features --features flex,train
//! ```
//!
//! Backend: `$BURN_SAM_BENCH_BACKEND`, else flex when compiled in, else ndarray.

use std::time::Instant;

use burn::prelude::*;
use burn::tensor::Distribution;
use burn_sam_sample::backend;

fn main() {
    let name = std::env::var("BURN_SAM_BENCH_BACKEND")
        .ok()
        .unwrap_or_else(|| if backend::enabled_backends().contains(&"flex") { "flex" } else { "ndarray" }.to_string());
    let device = match backend::select(Some(&name)) {
        Ok(device) => device,
        Err(err) => {
            eprintln!("error: {err}");
            std::process::exit(2);
        }
    };
    let n = 4_000_000;
    let g = Tensor::<1>::random([n], Distribution::Normal(0.0, 1.0), &device);
    let psf = Tensor::<1>::random([n], Distribution::Normal(0.0, 1.0), &device);
    let scale = Tensor::<1>::from_floats([0.5f32], &device);
    let skip = scale.clone().is_nan();
    let time = |label: &str, op: &dyn Fn() -> Tensor<1>| {
        for _ in 0..3 {
            let _ = op();
        }
        let _ = device.sync();
        let start = Instant::now();
        for _ in 0..20 {
            let _ = op();
        }
        let _ = device.sync();
        println!("{label:<40} {:.3} ms", start.elapsed().as_secs_f64() * 1000.0 / 20.0);
    };
    println!("backend {name}, {n} f32 values, mean of 20");
    time("sum (the guard's probe)", &|| g.clone().sum());
    time("dot g·g as 1×n by n×1 (‖g‖²)", &|| {
        g.clone().reshape([1, n]).matmul(g.clone().reshape([n, 1])).reshape([1])
    });
    time("square + sum (‖g‖², before)", &|| g.clone().square().sum());
    time("mul_scalar (β^k·PSF)", &|| psf.clone().mul_scalar(0.7));
    time("mul by a one-element tensor (ε = s·g)", &|| g.clone() * scale.clone());
    time("add (g + term, w + ε)", &|| g.clone() + psf.clone());
    time("sub (PSF = g_s − g)", &|| g.clone() - psf.clone());
    time("mask_fill by an expanded flag (guard)", &|| g.clone().mask_fill(skip.clone().expand([n]), 0.0));
    // The same operations on a uniquely owned operand, which a backend may update in place (flex
    // does): what an engine-internal or fused kernel would cost at best.
    let in_place = |label: &str, op: &dyn Fn(Tensor<1>) -> Tensor<1>| {
        let mut owned = g.clone() + 0.0;
        for _ in 0..3 {
            owned = op(owned);
        }
        let _ = device.sync();
        let start = Instant::now();
        for _ in 0..20 {
            owned = op(owned);
        }
        let _ = device.sync();
        println!("{label:<40} {:.3} ms", start.elapsed().as_secs_f64() * 1000.0 / 20.0);
    };
    in_place("add into an owned tensor (g += PSF)", &|owned| owned + psf.clone());
    in_place("mul_scalar of an owned tensor", &|owned| owned.mul_scalar(0.999_999));
    in_place("mask_fill of an owned tensor", &|owned| owned.mask_fill(skip.clone().expand([n]), 0.0));

    // A weight gradient as backward returns it (a 2048×2048 Linear, batch 64): the layout the
    // base optimizer and the engine receive. An operation on it costs more than on a contiguous
    // tensor when the layout is strided; the engine flattens it (a copy in that case).
    let autodiff = device.clone().autodiff();
    let layer = burn::nn::LinearConfig::new(2048, 2048).init(&autodiff);
    let x = Tensor::<2>::random([64, 2048], Distribution::Normal(0.0, 1.0), &autodiff);
    let mut grads = layer.forward(x).sum().backward();
    if let Some(weight_grad) = layer.weight.val().grad_remove(&mut grads) {
        let fixed = Tensor::<2>::random([2048, 2048], Distribution::Normal(0.0, 1.0), &device);
        let contiguous = weight_grad.clone() + 0.0;
        let time2 = |label: &str, op: &dyn Fn() -> Tensor<2>| time(label, &|| op().reshape([-1]));
        time2("add, a weight gradient as returned (4.2 M)", &|| weight_grad.clone() + fixed.clone());
        time2("add, the same values contiguous (4.2 M)", &|| contiguous.clone() + fixed.clone());
        time("flatten a weight gradient (4.2 M)", &|| weight_grad.clone().reshape([2048 * 2048]));
        time("flatten the contiguous copy (4.2 M)", &|| contiguous.clone().reshape([2048 * 2048]));
    }
}
