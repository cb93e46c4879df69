//! The engine's device-to-host reads, all through [`read`]: named slots, one transfer, a length
//! check. The engine counts every read in [`StepTelemetry::host_reads`](crate::StepTelemetry), so
//! the promise "no read on a cheap step, one per SAM step" is a number a test can check.

use burn::tensor::{DType, Device, Tensor};

/// The values of one read, by slot name.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct HostValues<const N: usize> {
    names: [&'static str; N],
    values: [f64; N],
}

impl<const N: usize> HostValues<N> {
    /// The value of slot `name`; NaN for a name that is not a slot (a programming error that
    /// then reads as a non-finite step, and is logged).
    pub fn get(&self, name: &str) -> f64 {
        match self.names.iter().position(|slot| *slot == name) {
            Some(index) => self.values[index],
            None => {
                log::error!("readback: no slot `{name}` in {:?}", self.names);
                f64::NAN
            }
        }
    }
}

/// Reads one-element f32 tensors, one per named slot, to the host in one transfer.
///
/// A read that returns another number of values than slots (no working backend does) is logged
/// with both counts and gives NaN in every slot, which the engine treats as a non-finite step:
/// never a value read from the wrong slot.
pub(crate) fn read<const N: usize>(slots: [(&'static str, Tensor<1>); N], device: &Device) -> HostValues<N> {
    let names = slots.each_ref().map(|(name, _)| *name);
    let parts: Vec<Tensor<1>> = slots.into_iter().map(|(_, t)| t.cast(DType::F32).to_device(device)).collect();
    let values: Vec<f64> = Tensor::cat(parts, 0).into_data().iter::<f32>().map(f64::from).collect();
    let got = values.len();
    let values = <[f64; N]>::try_from(values).unwrap_or_else(|_| {
        log::error!("readback: {got} values for the {N} slots {names:?}; the step counts as non-finite");
        [f64::NAN; N]
    });
    HostValues { names, values }
}

/// Reads one scalar (a one-element tensor) to the host.
pub(crate) fn read_one(name: &'static str, tensor: Tensor<1>) -> f64 {
    let device = tensor.device();
    read([(name, tensor)], &device).get(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_read_by_name_in_one_transfer() {
        let device = Device::flex();
        let one = |v: f32| Tensor::<1>::from_data([v], (&device, DType::F32));
        let values = read([("a", one(1.5)), ("b", one(-2.0)), ("c", one(f32::INFINITY))], &device);
        assert_eq!(values.get("b"), -2.0);
        assert_eq!(values.get("a"), 1.5);
        assert_eq!(values.get("c"), f64::INFINITY);
        assert!(values.get("missing").is_nan());
        assert_eq!(read_one("x", one(4.0)), 4.0);
    }

    #[test]
    fn a_read_of_the_wrong_length_is_nan_in_every_slot() {
        let device = Device::flex();
        // A slot of two values: the transfer has three values for two slots.
        let long = Tensor::<1>::from_data([1.0f32, 2.0], (&device, DType::F32));
        let short = Tensor::<1>::from_data([3.0f32], (&device, DType::F32));
        let values = read([("long", long), ("short", short)], &device);
        assert!(values.get("long").is_nan() && values.get("short").is_nan());
    }
}
