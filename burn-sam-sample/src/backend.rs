//! Devices selected by this crate's backend features (`ndarray`, `flex`, `wgpu`, `cuda`).
//!
//! Why this is in the library: a user picks the backend with this crate's features, and a
//! program with a `--backend` option needs the device of a compiled-in backend by name, with an
//! error that names the feature to turn on when it is missing. `Device::default()` cannot serve:
//! it picks CUDA or wgpu whenever any crate of the build enables them.

use burn::tensor::Device;

use crate::error::{Result, SamError};

/// The backends compiled into this build, most capable first.
pub fn enabled_backends() -> Vec<&'static str> {
    let mut names = Vec::new();
    if cfg!(feature = "cuda") {
        names.push("cuda");
    }
    if cfg!(feature = "wgpu") {
        names.push("wgpu");
    }
    if cfg!(feature = "flex") {
        names.push("flex");
    }
    if cfg!(feature = "ndarray") {
        names.push("ndarray");
    }
    names
}

/// The device of backend `name` (`cuda`, `wgpu`, `flex` or `ndarray`), or of the most capable
/// enabled backend when `name` is `None`.
///
/// Unlike `Device::default()`, the choice never depends on what other crates of the build enable,
/// and a backend that is not compiled in gives an error that says which feature to turn on.
pub fn select(name: Option<&str>) -> Result<Device> {
    let enabled = enabled_backends();
    let name = match name {
        Some(name) => name,
        None => enabled.first().copied().ok_or_else(|| {
            SamError::invalid(
                "backend",
                "none",
                "no backend feature is enabled: build with `--features ndarray` (CPU), `flex` (CPU), \
                 `wgpu` (GPU or software Vulkan) or `cuda`",
            )
        })?,
    };
    match name {
        #[cfg(feature = "cuda")]
        "cuda" => Ok(Device::cuda(0)),
        #[cfg(feature = "wgpu")]
        "wgpu" => Ok(Device::wgpu(burn::tensor::DeviceKind::DefaultDevice)),
        #[cfg(feature = "flex")]
        "flex" => Ok(Device::flex()),
        #[cfg(feature = "ndarray")]
        #[allow(deprecated)]
        "ndarray" => Ok(Device::ndarray()),
        #[allow(unreachable_patterns)]
        "cuda" | "wgpu" | "flex" | "ndarray" => Err(SamError::InvalidConfig {
            field: "backend",
            value: name.to_string(),
            reason: "this backend is not compiled in; rebuild with `--features <backend>`",
        }),
        _ => Err(SamError::invalid("backend", name, "unknown backend; use cuda, wgpu, flex or ndarray")),
    }
}

/// Keeps the memory a training step frees for the next step instead of handing it back to the
/// system, on Linux with glibc; call it once at the start of a program that trains on a CPU
/// backend. Returns whether the setting took effect (`false` elsewhere, where it does nothing).
///
/// A SAM step allocates two model-sized tensors a base step does not (the ascent and the PSF).
/// With glibc's default thresholds, memory freed at the end of a step is returned to the system
/// and faulted in again at the next step; on this project's benchmark that made a SAM step cost
/// 1.20–1.34 times two base steps instead of 0.97–1.06 (`docs/benchmarks.md`). This sets glibc's
/// `M_MMAP_THRESHOLD` to 32 MiB (its largest value: blocks up to that size come from the heap,
/// larger ones are mapped as before) and `M_TRIM_THRESHOLD` to 2 GiB (free memory at the top of
/// the heap is kept), process-wide. It is the same as starting the program with
/// `GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=2147483647`.
/// The process keeps its peak heap size for its lifetime.
pub fn keep_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const MMAP_THRESHOLD: libc::c_int = 32 << 20;
        // SAFETY: `mallopt` only sets glibc's allocation thresholds; it may be called at any time
        // from any thread and reports failure through its return value (1 on success).
        let mmap = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) };
        // SAFETY: as above.
        let trim = unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX) };
        mmap == 1 && trim == 1
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Whether `device` belongs to one of this crate's CPU backends (`flex`, `ndarray`), with or
/// without autodiff. The engine computes its dot products (‖g‖², ‖PSF‖²) as matrix products there
/// and as a product and a sum elsewhere, whichever is faster on each kind of backend.
pub fn runs_on_cpu(device: &Device) -> bool {
    #[cfg(feature = "flex")]
    if *device == Device::flex() {
        return true;
    }
    #[cfg(feature = "ndarray")]
    #[allow(deprecated)]
    if *device == Device::ndarray() {
        return true;
    }
    let _ = device;
    false
}

/// The CPU device of the enabled CPU backend: `ndarray` when its feature is on, else `flex`.
///
/// Tests name their device through this function rather than `Device::default()`, which would
/// pick CUDA or wgpu whenever those features are compiled in.
#[cfg(any(feature = "ndarray", feature = "flex"))]
#[allow(deprecated)]
pub fn cpu_device() -> Device {
    #[cfg(feature = "ndarray")]
    {
        Device::ndarray()
    }
    #[cfg(not(feature = "ndarray"))]
    {
        Device::flex()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeping_freed_memory_takes_effect_on_glibc() {
        assert_eq!(keep_freed_memory(), cfg!(all(target_os = "linux", target_env = "gnu")));
    }

    #[cfg(any(feature = "ndarray", feature = "flex"))]
    #[test]
    fn cpu_devices_are_recognized_with_or_without_autodiff() {
        assert!(runs_on_cpu(&cpu_device()));
        assert!(runs_on_cpu(&cpu_device().autodiff()));
        #[cfg(feature = "wgpu")]
        assert!(!runs_on_cpu(&Device::wgpu(burn::tensor::DeviceKind::DefaultDevice)));
    }

    #[test]
    fn unknown_or_missing_backends_are_named() {
        let err = select(Some("tpu")).unwrap_err();
        assert!(err.to_string().contains("`backend` = tpu"), "{err}");
        for name in ["cuda", "wgpu", "flex", "ndarray"] {
            let result = select(Some(name));
            assert_eq!(result.is_ok(), enabled_backends().contains(&name), "{name}");
        }
        assert!(select(None).is_ok());
    }
}
