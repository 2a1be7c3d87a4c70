//! The `dicomchain` command: parse the arguments and run; everything else is in `dicomchain::cli`.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    dicomchain::cli::run(dicomchain::cli::Cli::parse())
}
