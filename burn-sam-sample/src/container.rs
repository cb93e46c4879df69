//! The sealed burnpack container both record kinds are stored in: tensors plus the engine's state
//! as JSON in the metadata, sealed with a CRC-32 over both, so that truncated, bit-flipped or
//! foreign bytes give an error instead of a loaded state.

use std::collections::BTreeMap;
use std::path::Path;

use burn::store::RecordError;
use burn::tensor::{Bytes, DType, TensorData};
use burn_pack::{Reader, Writer};

use crate::error::{Result, SamError};

const STATE_KEY: &str = "burn-sam-sample.engine";
const CHECKSUM_KEY: &str = "burn-sam-sample.crc32";

/// The tensors of a container, by name.
pub(crate) type Tensors = BTreeMap<String, burn_pack::Tensor>;

/// A record stored in a sealed container.
pub(crate) trait Sealed: Sized {
    /// The tensors and the state JSON.
    fn into_parts(self) -> Result<(Vec<burn_pack::Tensor>, String)>;

    /// Rebuilds the record from the tensors (the ones it takes are removed) and the state JSON.
    fn from_parts(tensors: &mut Tensors, state: &str) -> Result<Self>;
}

fn writer<R: Sealed>(record: R) -> Result<Writer> {
    let (tensors, state) = record.into_parts()?;
    let crc = checksum(&tensors, &state)?;
    Ok(Writer::new(tensors).with_metadata(STATE_KEY, &state).with_metadata(CHECKSUM_KEY, &crc))
}

/// Serializes `record` to burnpack bytes.
pub(crate) fn to_bytes<R: Sealed>(record: R) -> Result<Bytes> {
    Ok(writer(record)?.into_bytes().map_err(RecordError::from)?)
}

/// Writes `record` to `path` (used as given, no extension added).
pub(crate) fn save<R: Sealed>(record: R, path: &Path) -> Result<()> {
    writer(record)?.auto_extension(false).write_to_file(path).map_err(RecordError::from)?;
    Ok(())
}

/// Decodes a record from burnpack bytes; hostile bytes give an error, never a panic.
pub(crate) fn from_bytes<R: Sealed>(bytes: Bytes) -> Result<R> {
    let reader = Reader::from_bytes(bytes).map_err(|e| SamError::CorruptRecord(e.to_string()))?;
    let metadata = reader.metadata().clone();
    let mut tensors: Tensors = reader
        .into_tensors()
        .map_err(|e| SamError::CorruptRecord(e.to_string()))?
        .into_iter()
        .map(|tensor| (tensor.name.clone(), tensor))
        .collect();
    let state =
        metadata.get(STATE_KEY).ok_or_else(|| SamError::CorruptRecord(format!("metadata `{STATE_KEY}` is missing")))?;
    let stored = metadata
        .get(CHECKSUM_KEY)
        .ok_or_else(|| SamError::CorruptRecord(format!("metadata `{CHECKSUM_KEY}` is missing")))?;
    let computed = checksum(tensors.values(), state)?;
    if *stored != computed {
        return Err(SamError::CorruptRecord(format!(
            "checksum mismatch (stored {stored}, computed {computed}): the record is damaged"
        )));
    }
    R::from_parts(&mut tensors, state)
}

/// Reads a record file whole: its tensors must not stay backed by a file that a checkpoint
/// rotation may delete or overwrite later.
pub(crate) fn load<R: Sealed>(path: &Path) -> Result<R> {
    let bytes = std::fs::read(path)
        .map_err(|e| SamError::Record(RecordError::Io(format!("cannot read '{}': {e}", path.display()))))?;
    from_bytes(Bytes::from_bytes_vec(bytes))
}

/// CRC-32 over every tensor (name, dtype, shape, bytes, in name order) and the state JSON.
fn checksum<'a>(tensors: impl IntoIterator<Item = &'a burn_pack::Tensor>, state: &str) -> Result<String> {
    let mut sorted: Vec<&burn_pack::Tensor> = tensors.into_iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let mut hasher = crc32fast::Hasher::new();
    for tensor in sorted {
        hasher.update(tensor.name.as_bytes());
        hasher.update(format!("{:?}{:?}", tensor.dtype, tensor.shape.as_slice()).as_bytes());
        let bytes = tensor.to_bytes().map_err(|e| SamError::CorruptRecord(format!("tensor `{}`: {e}", tensor.name)))?;
        hasher.update(&bytes);
    }
    hasher.update(state.as_bytes());
    Ok(format!("{:08x}", hasher.finalize()))
}

/// A container tensor holding `data`.
pub(crate) fn pack(name: String, param_id: Option<u64>, data: TensorData) -> burn_pack::Tensor {
    let (bytes, shape, dtype) = data.into_parts();
    burn_pack::Tensor::new(name, dtype, shape, param_id, bytes)
}

/// Takes tensor `name` out of `tensors` as data of `dtype` and rank 1.
pub(crate) fn take(tensors: &mut Tensors, name: &str, dtype: DType) -> Result<Option<TensorData>> {
    tensors.remove(name).map(|tensor| unpack(name, tensor, dtype)).transpose()
}

/// `tensor` as data of `dtype` and rank 1; anything else is a corrupt record.
pub(crate) fn unpack(name: &str, tensor: burn_pack::Tensor, dtype: DType) -> Result<TensorData> {
    unpack_one_of(name, tensor, &[dtype])
}

/// `tensor` as data of one of the `allowed` dtypes and rank 1; anything else is a corrupt record.
pub(crate) fn unpack_one_of(name: &str, tensor: burn_pack::Tensor, allowed: &[DType]) -> Result<TensorData> {
    let (_, found, shape, _, bytes) =
        tensor.into_parts().map_err(|e| SamError::CorruptRecord(format!("tensor `{name}`: {e}")))?;
    if !allowed.contains(&found) || shape.num_dims() != 1 {
        return Err(SamError::CorruptRecord(format!(
            "tensor `{name}` must be a rank-1 tensor of {allowed:?}, found {found:?} with shape {shape}"
        )));
    }
    TensorData::try_from_bytes(bytes, shape, found)
        .map_err(|e| SamError::CorruptRecord(format!("tensor `{name}`: {e:?}")))
}
