//! The small CNN of the examples and benchmarks: two conv + BatchNorm + pooling blocks and a
//! two-layer classifier head.

use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, Dropout, DropoutConfig, Linear, LinearConfig, PaddingConfig2d, Relu};
use burn::prelude::*;

/// Conv(1→c) · BN · ReLU · pool → Conv(c→2c) · BN · ReLU · pool → Linear(2c·7·7→hidden) · ReLU ·
/// dropout → Linear(hidden→10).
#[derive(Module, Debug)]
pub struct Cnn {
    conv1: Conv2d,
    bn1: BatchNorm,
    conv2: Conv2d,
    bn2: BatchNorm,
    pool: MaxPool2d,
    fc1: Linear,
    dropout: Dropout,
    fc2: Linear,
    relu: Relu,
}

/// Sizes of the [`Cnn`].
#[derive(Config, Debug)]
pub struct CnnConfig {
    /// Channels of the first convolution (the second has twice as many).
    #[config(default = 16)]
    pub channels: usize,
    /// Width of the hidden layer.
    #[config(default = 128)]
    pub hidden: usize,
    /// Dropout before the last layer.
    #[config(default = 0.2)]
    pub dropout: f64,
}

impl CnnConfig {
    /// Builds the network on `device`.
    pub fn init(&self, device: &Device) -> Cnn {
        let c = self.channels;
        let conv = |from, to| Conv2dConfig::new([from, to], [3, 3]).with_padding(PaddingConfig2d::Same).init(device);
        Cnn {
            conv1: conv(1, c),
            bn1: BatchNormConfig::new(c).init(device),
            conv2: conv(c, 2 * c),
            bn2: BatchNormConfig::new(2 * c).init(device),
            pool: MaxPool2dConfig::new([2, 2]).init(),
            fc1: LinearConfig::new(2 * c * 7 * 7, self.hidden).init(device),
            dropout: DropoutConfig::new(self.dropout).init(),
            fc2: LinearConfig::new(self.hidden, 10).init(device),
            relu: Relu::new(),
        }
    }
}

impl Cnn {
    /// The same network with every float parameter and BatchNorm running statistic cast to
    /// `dtype` (ids and require-grad settings kept), in running-state cells of its own.
    pub fn with_float_dtype(self, dtype: burn::tensor::DType) -> Self {
        struct Cast(burn::tensor::DType);
        impl burn::module::ModuleMapper for Cast {
            fn map_float<const D: usize>(
                &mut self,
                param: burn::module::Param<Tensor<D>>,
            ) -> burn::module::Param<Tensor<D>> {
                let dtype = self.0;
                param.map(|t| Tensor::from_inner(t.inner().cast(dtype)).require_grad())
            }
        }
        let cast_stats = |mut bn: BatchNorm| {
            bn.running_mean = burn::module::RunningState::new(bn.running_mean.value().cast(dtype));
            bn.running_var = burn::module::RunningState::new(bn.running_var.value().cast(dtype));
            bn
        };
        // New running-state cells first: a clone shares them with its original.
        let mut fresh = self;
        fresh.bn1 = cast_stats(fresh.bn1);
        fresh.bn2 = cast_stats(fresh.bn2);
        fresh.map(&mut Cast(dtype))
    }

    /// Logits `[B, 10]` for images `[B, 1, 28, 28]`.
    pub fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        let x = self.pool.forward(self.relu.forward(self.bn1.forward(self.conv1.forward(images))));
        let x = self.pool.forward(self.relu.forward(self.bn2.forward(self.conv2.forward(x))));
        let x: Tensor<2> = x.flatten(1, 3);
        let x = self.dropout.forward(self.relu.forward(self.fc1.forward(x)));
        self.fc2.forward(x)
    }
}
