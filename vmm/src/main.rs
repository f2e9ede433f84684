//! `vmm` binary: parse arguments, run the VM, print the whole error chain.

use std::io::Write;
use std::process::ExitCode;

use vmm::cli::{Args, PARSE_ERROR_STATUS};
use vmm::runtime;

/// Writes log records to stderr as `[vmm LEVEL] message`.
struct StderrLogger;

impl log::Log for StderrLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            // The whole line is built first and written with one write, so
            // it never interleaves with the plugin's output or another
            // thread's line.
            let line = format!("[vmm {}] {}\n", record.level(), record.args());
            let _ = std::io::stderr().lock().write_all(line.as_bytes());
        }
    }

    fn flush(&self) {}
}

static LOGGER: StderrLogger = StderrLogger;

fn main() -> ExitCode {
    if let Some(code) = ctl_command() {
        return code;
    }
    if let Some(code) = replay_command() {
        return code;
    }
    let args = match Args::from_command_line(std::env::args_os()) {
        Ok(a) => a,
        Err(e) => {
            let status = if e.use_stderr() {
                PARSE_ERROR_STATUS
            } else {
                0
            };
            let _ = e.print();
            return ExitCode::from(status as u8);
        }
    };
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(args.log_level);

    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmm: error: {}", vmm::error_chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    if args.mem.is_some() {
        log::info!("--mem is ignored: guest memory comes from the plugin");
    }
    let config = args.vm_config(|name| std::env::var_os(name))?;
    vmm::trace::init(&args.trace_config())?;
    let result = runtime::run(config);
    if args.stats {
        let _ = std::io::stderr().write_all(vmm::stats::report().table().as_bytes());
    }
    result?;
    Ok(())
}

/// `vmm ctl ...` and crosvm's `vmm stop|suspend|resume|powerbtn PATH`:
/// `None` for any other command line.
fn ctl_command() -> Option<ExitCode> {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if argv.get(1).is_some_and(|w| w == "ctl") {
        let mut args = vec![std::ffi::OsString::from("vmm ctl")];
        args.extend(argv[2..].iter().cloned());
        return Some(ExitCode::from(vmm::ctl::main(args)));
    }
    let args = vmm::ctl::crosvm_spelling(&argv)?;
    Some(ExitCode::from(vmm::ctl::main(args)))
}

/// `vmm replay FILE...` / `vmm decode FILE...`: `None` for any other
/// command line.
fn replay_command() -> Option<ExitCode> {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let word = argv.get(1)?.to_str()?;
    if word != "replay" && word != "decode" {
        return None;
    }
    let files: Vec<std::path::PathBuf> = argv[2..].iter().map(Into::into).collect();
    if files.is_empty() || files.iter().any(|f| f.as_os_str() == "--help") {
        eprintln!("usage: vmm {word} FILE...\nPrints sessions recorded with VMM_RECORD_DIR.");
        return Some(ExitCode::from(PARSE_ERROR_STATUS as u8));
    }
    let mut out = std::io::stdout().lock();
    match vmm::replay::replay(&files, &mut out) {
        Ok(()) => Some(ExitCode::SUCCESS),
        Err(e) => {
            eprintln!("vmm: error: {}", vmm::error_chain(&e));
            Some(ExitCode::FAILURE)
        }
    }
}
