//! Devices selected by this crate's backend features.

use burn::tensor::Device;

/// The CPU device of the enabled CPU backend: `ndarray` when its feature is on, else `flex`.
///
/// Tests and examples name their device through this function rather than `Device::default()`,
/// which would pick CUDA or wgpu whenever those features are compiled in.
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
