//! The AFL++ binary: AFL++'s libFuzzer-compatible driver (`libAFLDriver.a`, linked by
//! `scripts/fuzz.sh`) supplies `main` and calls [`LLVMFuzzerTestOneInput`] with each
//! input, in persistent mode. `FUZZ_TARGET` names the target (see `fuzz::TARGETS`).
//! Run by hand with input files as arguments to replay them.

#![no_main]
// The driver calls in through the C ABI: an exported, unmangled symbol.
#![allow(unsafe_code, clippy::panic)]

use std::sync::OnceLock;

fn target() -> fuzz::Target {
    static TARGET: OnceLock<fuzz::Target> = OnceLock::new();
    *TARGET.get_or_init(|| {
        let name = std::env::var("FUZZ_TARGET").unwrap_or_default();
        let Some(target) = fuzz::target(&name) else {
            let names: Vec<&str> = fuzz::TARGETS.iter().map(|(n, _)| *n).collect();
            eprintln!("FUZZ_TARGET must be one of {names:?}, not {name:?}");
            std::process::exit(2);
        };
        // A panic anywhere (a failed property, or inside the server's tasks) is a crash.
        std::panic::set_hook(Box::new(|info| {
            eprintln!("{info}");
            std::process::abort();
        }));
        target
    })
}

/// Run the target on one input (the driver's callback).
///
/// # Safety
/// `data` points to `size` readable bytes, or is null when `size` is 0.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn LLVMFuzzerTestOneInput(data: *const u8, size: usize) -> i32 {
    let input = if data.is_null() || size == 0 {
        &[][..]
    } else {
        // SAFETY: the driver hands over `size` bytes at `data`, valid during the call.
        unsafe { std::slice::from_raw_parts(data, size) }
    };
    target()(input);
    0
}
