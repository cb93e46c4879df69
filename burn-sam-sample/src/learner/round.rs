//! One optimizer step of the Learner, as a gate round: one decision ([`Plan`]) shared by every
//! micro-batch and device of the step, and the mean of what they measured.
//!
//! Transitions (each under the handle's lock, never across tensor work):
//! - [`Round::open`]: the engine plans the optimizer step (first train step after `optimize`);
//! - [`Round::plan_for_step`]: each train step takes the plan (the first SAM step also takes the
//!   device-side count of earlier non-finite cheap steps, so it is read once);
//! - [`Round::add`]: each train step's lesson, after the engine booked it;
//! - [`Round::close`]: at `TrainStep::optimize`, the mean lesson for
//!   [`SamEngine::learn`](crate::engine::SamEngine).

use std::collections::HashMap;

use burn::module::ParamId;
use burn::tensor::Tensor;

use crate::engine::{CacheParts, Lesson, Plan};
use crate::policy::PsfStats;

#[derive(Debug)]
pub(crate) struct Round {
    plan: Plan,
    lessons: Vec<Lesson>,
}

impl Round {
    pub fn open(plan: Plan) -> Self {
        Self { plan, lessons: Vec::new() }
    }

    /// The plan of the next train step of this optimizer step.
    pub fn plan_for_step(&mut self) -> Plan {
        let plan = self.plan.clone();
        self.plan.cheap_non_finite = None;
        plan
    }

    pub fn add(&mut self, lesson: Lesson) {
        self.lessons.push(lesson);
    }

    /// What the round's train steps teach, averaged: the cache over the steps that cached, the
    /// statistics over the successful SAM steps, ‖g‖² over the steps that measured it.
    pub fn close(self) -> Lesson {
        let sam = self.plan.sam;
        let mut cache: Option<CacheParts> = None;
        let mut cached = 0u32;
        let mut stats = Vec::new();
        let mut host = Vec::new();
        let mut device: Option<Tensor<1>> = None;
        let mut measured = 0u32;
        for lesson in self.lessons {
            stats.extend(lesson.stats);
            host.extend(lesson.grad_sq_host);
            if let Some(grad_sq) = lesson.grad_sq_device {
                measured += 1;
                device = Some(match device.take() {
                    Some(sum) => {
                        let on = sum.device();
                        sum + grad_sq.to_device(&on)
                    }
                    None => grad_sq,
                });
            }
            if let Some((tensors, layout, place)) = lesson.cache {
                cached += 1;
                cache = Some(match cache.take() {
                    None => (tensors, layout, place),
                    Some((sum, layout, place)) => (add(sum, tensors, &place), layout, place),
                });
            }
        }
        let cache = cache.map(|(sum, layout, place)| (scale(sum, cached), layout, place));
        let stats = (!stats.is_empty()).then(|| {
            let n = stats.len() as f64;
            PsfStats {
                psf_norm: stats.iter().map(|s| s.psf_norm).sum::<f64>() / n,
                ratio: stats.iter().map(|s| s.ratio).sum::<f64>() / n,
            }
        });
        let grad_sq_host = (!host.is_empty()).then(|| host.iter().sum::<f64>() / host.len() as f64);
        let grad_sq_device = device.map(|sum| if measured > 1 { sum.div_scalar(measured as f64) } else { sum });
        Lesson { sam, cache, stats, grad_sq_host, grad_sq_device }
    }
}

/// `sum + more`, per parameter, on `device`.
fn add(
    mut sum: HashMap<ParamId, Tensor<1>>,
    more: HashMap<ParamId, Tensor<1>>,
    device: &burn::tensor::Device,
) -> HashMap<ParamId, Tensor<1>> {
    for (id, tensor) in more {
        let tensor = tensor.to_device(device);
        let total = match sum.remove(&id) {
            Some(previous) => previous + tensor,
            None => tensor,
        };
        sum.insert(id, total);
    }
    sum
}

fn scale(sum: HashMap<ParamId, Tensor<1>>, count: u32) -> HashMap<ParamId, Tensor<1>> {
    if count <= 1 {
        return sum;
    }
    let factor = 1.0 / count as f64;
    sum.into_iter().map(|(id, t)| (id, t.mul_scalar(factor))).collect()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use burn::tensor::{DType, Device};

    use super::*;
    use crate::config::SamConfig;
    use crate::reuse::CheapTerm;

    fn plan(sam: bool) -> Plan {
        let device = Device::flex();
        Plan {
            sam,
            term: CheapTerm::Plain,
            cache: Arc::default(),
            config: SamConfig::sam(),
            wants_grad_norm: false,
            cheap_non_finite: Some(Tensor::from_data([2.0f32], (&device, DType::F32))),
        }
    }

    fn lesson(value: f32, psf_norm: f64, grad_sq: Option<f64>) -> Lesson {
        let device = Device::flex();
        let id = ParamId::from(7);
        let tensors = HashMap::from([(id, Tensor::<1>::from_data([value, 2.0 * value], (&device, DType::F32)))]);
        Lesson {
            sam: true,
            cache: Some((tensors, vec![(id, DType::F32)], device)),
            stats: Some(PsfStats { psf_norm, ratio: psf_norm / 8.0 }),
            grad_sq_host: grad_sq,
            grad_sq_device: None,
        }
    }

    #[test]
    fn only_the_first_step_of_a_round_reads_the_cheap_steps_count() {
        let mut round = Round::open(plan(true));
        assert!(round.plan_for_step().cheap_non_finite.is_some());
        assert!(round.plan_for_step().cheap_non_finite.is_none());
        assert!(round.plan_for_step().sam);
    }

    #[test]
    fn a_round_teaches_the_mean_of_its_steps() {
        let mut round = Round::open(plan(true));
        round.add(lesson(1.0, 2.0, Some(4.0)));
        round.add(lesson(3.0, 4.0, Some(8.0)));
        // A skipped SAM step (second pass not finite): it measured ‖g‖² but caches nothing.
        round.add(Lesson { sam: true, cache: None, stats: None, grad_sq_host: Some(0.0), grad_sq_device: None });
        let closed = round.close();
        let (tensors, _, _) = closed.cache.unwrap();
        let mean: Vec<f32> = tensors[&ParamId::from(7)].clone().into_data().iter::<f32>().collect();
        assert_eq!(mean, vec![2.0, 4.0]);
        assert_eq!(closed.stats, Some(PsfStats { psf_norm: 3.0, ratio: 0.375 }));
        assert_eq!(closed.grad_sq_host, Some(4.0));
        assert!(closed.sam);
    }

    #[test]
    fn cheap_rounds_average_the_device_norms() {
        let device = Device::flex();
        let mut round = Round::open(plan(false));
        for value in [2.0f32, 6.0] {
            let grad_sq = Some(Tensor::<1>::from_data([value], (&device, DType::F32)));
            round.add(Lesson { sam: false, cache: None, stats: None, grad_sq_host: None, grad_sq_device: grad_sq });
        }
        let closed = round.close();
        assert_eq!(closed.grad_sq_device.map(|t| t.into_scalar::<f32>()), Some(4.0));
        assert!(closed.cache.is_none() && closed.stats.is_none() && !closed.sam);
    }
}
