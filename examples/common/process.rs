//! What every example does at its door: output that ends quietly when its reader goes away,
//! and a digest of the trained weights that two runs can be compared by.

use std::hash::Hasher;
use std::process::ExitCode;

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::Tensor;

/// Restores the default action of SIGPIPE (Unix), which Rust's runtime ignores: a program whose
/// output is closed (`example | head -n 1`) then ends quietly, as Unix tools do, instead of
/// panicking in `println!` with exit 101.
pub fn end_quietly_on_closed_output() {
    #[cfg(unix)]
    // SAFETY: called at the start of `main`, before any thread exists; setting a signal's
    // disposition to its default has no other effect.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// A digest of every float parameter's values (in the module's visiting order, not their ids):
/// equal digests mean equal weights, bit for bit. Compare digests printed by one build: the
/// hasher (`DefaultHasher`) is fixed within a Rust release, not across releases.
pub fn weights_digest<M: Module>(module: &M) -> String {
    struct Digest(std::collections::hash_map::DefaultHasher, usize);
    impl ModuleVisitor for Digest {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let data = param.val().to_data();
            self.0.write(data.as_bytes());
            self.1 += data.num_elements();
        }
    }
    let mut digest = Digest(Default::default(), 0);
    module.visit(&mut digest);
    format!("{:016x} ({} values)", digest.0.finish(), digest.1)
}

/// The exit of a program's body: 0, or its error printed with `Display` and 1.
pub fn exit_with(result: Result<(), Box<dyn std::error::Error>>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

/// A usage error found after parsing (options that do not fit together): printed, exit 2.
pub fn usage_error(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(2)
}
