//! A training data loader whose every epoch is a function of (seed, epoch), so that a run resumed
//! from a checkpoint sees the batches and random draws of the uninterrupted run.
//!
//! Burn's own loader shuffles with a generator that advances at each epoch and starts over when
//! the program restarts, so a resumed epoch N+1 repeats epoch 1's order; dropout draws from the
//! device's generator, which is not saved either. This loader derives, at the start of epoch e,
//! three seeds from (seed, e): one for the order, one for the batcher
//! ([`EpochBatcher::start_epoch`]) and one for the device's generator (dropout and any other
//! random tensor operation of the train step).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use burn::data::dataloader::batcher::Batcher;
use burn::data::dataloader::{DataLoader, DataLoaderIterator, Progress};
use burn::data::dataset::transform::PartialDataset;
use burn::data::dataset::{Dataset, DatasetError};
use burn::tensor::Device;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::error::{Result, SamError};

/// A batcher that can restart its random draws (augmentation, say) at each epoch.
pub trait EpochBatcher<I, O>: Batcher<I, O> {
    /// Called at the start of each epoch, before its first batch, with a seed that is a function
    /// of the loader's seed and the epoch: reset any random generator of the batcher from it, and
    /// draw in batch order. The default does nothing (a batcher without randomness).
    fn start_epoch(&self, seed: u64) {
        let _ = seed;
    }
}

/// The seed of stream `stream` in epoch `epoch` of a run seeded with `seed` (SplitMix64 mixing,
/// so that neighbouring epochs and streams get unrelated seeds).
pub fn epoch_seed(seed: u64, epoch: usize, stream: u64) -> u64 {
    let mut z = seed ^ (epoch as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ stream.wrapping_mul(0xd1b5_4a32_d192_ed03);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

const ORDER: u64 = 1;
const BATCHER: u64 = 2;
const DEVICE: u64 = 3;

/// A shuffling training loader for exact resume (see the module documentation). Batches are
/// built one at a time on the thread that iterates, in order, so the draws of the batcher and of
/// the train step interleave the same way in every run.
pub struct EpochLoader<I, O> {
    dataset: Arc<dyn Dataset<I>>,
    batcher: Arc<dyn EpochBatcher<I, O>>,
    batch_size: usize,
    seed: u64,
    device: Device,
    /// The epoch the next `iter` starts; shared by the loader's copies (`to_device`).
    next_epoch: Arc<AtomicUsize>,
}

impl<I, O> EpochLoader<I, O>
where
    I: Send + Sync + Clone + 'static,
    O: Send + 'static,
{
    /// A loader over `dataset` in batches of `batch_size`, seeded with `seed`, starting at
    /// epoch 1; a `batch_size` of 0 is an error naming it.
    pub fn new(
        dataset: impl Dataset<I> + 'static,
        batcher: impl EpochBatcher<I, O> + 'static,
        batch_size: usize,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        if batch_size == 0 {
            return Err(SamError::invalid("batch_size", batch_size, "must be at least 1"));
        }
        Ok(Self {
            dataset: Arc::new(dataset),
            batcher: Arc::new(batcher),
            batch_size,
            seed,
            device: device.clone(),
            next_epoch: Arc::new(AtomicUsize::new(1)),
        })
    }

    /// Starts at epoch `epoch`: `resume + 1` when the run resumes from the checkpoint of epoch
    /// `resume`. Epochs count from 1, as Burn's do; 0 means 1.
    pub fn starting_at_epoch(self, epoch: usize) -> Self {
        self.next_epoch.store(epoch.max(1), Ordering::SeqCst);
        self
    }

    /// The epoch the next iteration will be.
    pub fn next_epoch(&self) -> usize {
        self.next_epoch.load(Ordering::SeqCst)
    }

    fn with(&self, dataset: Arc<dyn Dataset<I>>, device: Device) -> Self {
        Self {
            dataset,
            batcher: self.batcher.clone(),
            batch_size: self.batch_size,
            seed: self.seed,
            device,
            next_epoch: self.next_epoch.clone(),
        }
    }
}

impl<I, O> DataLoader<O> for EpochLoader<I, O>
where
    I: Send + Sync + Clone + 'static,
    O: Send + 'static,
{
    fn iter<'a>(&'a self) -> Box<dyn DataLoaderIterator<O> + 'a> {
        let epoch = self.next_epoch.fetch_add(1, Ordering::SeqCst);
        let mut order: Vec<usize> = (0..self.dataset.len()).collect();
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(epoch_seed(self.seed, epoch, ORDER)));
        self.batcher.start_epoch(epoch_seed(self.seed, epoch, BATCHER));
        self.device.seed(epoch_seed(self.seed, epoch, DEVICE));
        Box::new(EpochIter { loader: self, order, position: 0 })
    }

    fn num_items(&self) -> usize {
        self.dataset.len()
    }

    fn to_device(&self, device: &Device) -> Arc<dyn DataLoader<O>> {
        Arc::new(self.with(self.dataset.clone(), device.clone()))
    }

    fn slice(&self, start: usize, end: usize) -> Arc<dyn DataLoader<O>> {
        let part = PartialDataset::new(self.dataset.clone(), start, end);
        Arc::new(self.with(Arc::new(part), self.device.clone()))
    }
}

struct EpochIter<'a, I, O> {
    loader: &'a EpochLoader<I, O>,
    order: Vec<usize>,
    position: usize,
}

impl<I, O> Iterator for EpochIter<'_, I, O> {
    type Item = Result<O, DatasetError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.position >= self.order.len() {
            return None;
        }
        let end = (self.position + self.loader.batch_size).min(self.order.len());
        let mut items = Vec::with_capacity(end - self.position);
        for &index in &self.order[self.position..end] {
            match self.loader.dataset.get(index) {
                Ok(item) => items.push(item),
                Err(err) => {
                    self.position = self.order.len();
                    return Some(Err(err));
                }
            }
        }
        self.position = end;
        Some(Ok(self.loader.batcher.batch(items, &self.loader.device)))
    }
}

impl<I, O> DataLoaderIterator<O> for EpochIter<'_, I, O> {
    fn progress(&self) -> Progress {
        Progress::new(self.position, self.order.len(), Some("items".to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::data::dataset::InMemDataset;

    struct Identity;

    impl Batcher<usize, Vec<usize>> for Identity {
        fn batch(&self, items: Vec<usize>, _: &Device) -> Vec<usize> {
            items
        }
    }

    impl EpochBatcher<usize, Vec<usize>> for Identity {}

    fn epoch(loader: &EpochLoader<usize, Vec<usize>>) -> Vec<Vec<usize>> {
        loader.iter().collect::<Result<_, _>>().unwrap()
    }

    #[test]
    fn each_epoch_is_a_function_of_the_seed_and_the_epoch() {
        let device = crate::backend::cpu_device();
        let loader = || EpochLoader::new(InMemDataset::new((0..10).collect()), Identity, 4, 7, &device).unwrap();
        let straight = loader();
        let epochs: Vec<_> = (0..3).map(|_| epoch(&straight)).collect();
        assert_ne!(epochs[0], epochs[1], "a new order each epoch");
        assert_eq!(epochs[0].iter().map(Vec::len).collect::<Vec<_>>(), [4, 4, 2]);
        let mut all: Vec<usize> = epochs[1].concat();
        all.sort_unstable();
        assert_eq!(all, (0..10).collect::<Vec<_>>(), "every item once per epoch");
        let resumed = loader().starting_at_epoch(3);
        assert_eq!(epoch(&resumed), epochs[2], "epoch 3 after a restart equals epoch 3 of the run");
        let moved = straight.to_device(&device);
        let err = EpochLoader::new(InMemDataset::new(vec![1usize]), Identity, 0, 7, &device).err().unwrap();
        assert!(err.to_string().contains("`batch_size` = 0"), "{err}");
        assert_eq!(moved.iter().collect::<Result<Vec<_>, _>>().unwrap(), epoch(&loader().starting_at_epoch(4)));
    }
}
