//! The loss of Burn's train-step outputs, so that a train step can hand its forward function to
//! [`SamHandle::train_step`](super::SamHandle::train_step) as it is.

use burn::tensor::Tensor;
use burn::train::{ClassificationOutput, MultiLabelClassificationOutput, RegressionOutput, SequenceOutput};

/// An output that carries the scalar loss of its batch.
pub trait HasLoss {
    /// The scalar loss to differentiate.
    fn loss(&self) -> Tensor<1>;
}

macro_rules! has_loss_field {
    ($($output:ty),*) => {$(
        impl HasLoss for $output {
            fn loss(&self) -> Tensor<1> {
                self.loss.clone()
            }
        }
    )*};
}

has_loss_field!(ClassificationOutput, MultiLabelClassificationOutput, RegressionOutput, SequenceOutput);
