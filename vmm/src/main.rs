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
    runtime::run(config)?;
    Ok(())
}
