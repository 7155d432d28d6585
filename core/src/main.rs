//! The `hicra` binary: parse arguments, set up logging, run, map errors to an exit code.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    hicra_core::memory::reuse_freed_memory();
    let cli = hicra_core::cli::Cli::parse();
    hicra_core::cli::init_tracing(cli.verbose);
    match hicra_core::cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
