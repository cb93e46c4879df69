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
