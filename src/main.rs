//! The `debimg` command line: parses its arguments ([`debimg::cli`]) and calls the command's
//! body in the library, in the module of its subject.

use std::process::ExitCode;

use clap::Parser;

use debimg::cli::{Cli, Command};
use debimg::error::Error;
use debimg::service::{self, client};
use debimg::{boottest, cache, input, job, pack, verify, vm};

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A build's processes (and the scripts it runs as root) can read /proc/1/environ: a build
    // forgets every variable outside the allowlist before it starts (a token, a password in a
    // URL, a cloud key of whoever runs it).
    if matches!(
        cli.command,
        Command::Build(_) | Command::Verify(_) | Command::Lock(_) | Command::VmImage(_)
    ) && let Err(e) = debimg::environ::reexec_clean()
    {
        eprintln!("error: {e:#}");
        return ExitCode::from(1);
    }
    init_logging(cli.verbose, cli.quiet);
    ExitCode::from(match run(&cli) {
        Ok(code) => code,
        Err(e) => {
            if !e.is_reported() {
                eprintln!("error: {}", debimg::redact::text(&e.to_string()));
            }
            e.exit_code()
        }
    })
}

/// Runs the command; `Ok` holds the exit code, not 0 only for a build service's job waited for
/// (`submit --follow` or `--download`, `jobs log -f`): its outcome, already reported.
fn run(cli: &Cli) -> Result<u8, Error> {
    // The output of the bootstrap and apt, unless --quiet.
    let progress = !cli.quiet;
    match &cli.command {
        Command::Validate(args) => input::validate(args),
        Command::Plan(args) => input::print_plan(args),
        Command::Build(args) => job::build(args, progress),
        Command::Lock(args) => job::lock(args, progress),
        Command::Verify(args) => verify::verify(args, progress),
        Command::VmImage(args) => job::vm_image(args, progress),
        Command::VmProxy { allow } => Ok(vm::egress::serve_one(allow)?),
        Command::Pack(args) => pack::pack_image(args),
        Command::Cache { cache_dir, action } => cache::manage(cache_dir, action),
        Command::BootTest(args) => boottest::boot_test(args),
        Command::Serve { action, args } => service::cli::serve(action.as_ref(), args),
        Command::Worker(args) => service::worker::work(args),
        Command::Submit(args) => return client::submit(args),
        Command::Jobs { server, action } => return client::jobs(server, action),
    }?;
    Ok(0)
}

/// stderr for log lines, URL credentials masked (each event comes as one write).
struct RedactedStderr;

impl std::io::Write for RedactedStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        // Below the log and above the status line, when there is one.
        debimg::progress::write_log(debimg::redact::text(&text).as_bytes());
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// The process's log: to stderr through [`RedactedStderr`], at the level of -v/-q unless
/// DEBIMG_LOG says otherwise. The binary's to choose: a program using the library sets up its
/// own.
fn init_logging(verbose: u8, quiet: bool) {
    let level = match (quiet, verbose) {
        (true, _) => "warn",
        (false, 0) => "info",
        (false, _) => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("DEBIMG_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("debimg={level}")));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| RedactedStderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .without_time()
        .init();
}
