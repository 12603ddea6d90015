//! The `debimg` command line: parses its arguments ([`debimg::cli`]) and calls the library.

use std::io::Write as _;
use std::process::ExitCode;

use clap::Parser;

use debimg::cli::{
    Cli, Command, JobsAction, ServeAction, ServeArgs, ServerArgs, SubmitArgs, TokenAction,
    WorkerArgs,
};

use debimg::error::Error;
use debimg::input;
use debimg::job;

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
        Ok(()) => 0,
        Err(e) => {
            if !e.is_reported() {
                eprintln!("error: {}", debimg::redact::text(&e.to_string()));
            }
            e.exit_code()
        }
    })
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

/// An error of a command that is not a build (those run on the library's own errors).
fn failed(e: anyhow::Error) -> Error {
    Error::classify(e, None)
}

fn run(cli: &Cli) -> Result<(), Error> {
    match &cli.command {
        Command::Validate(args) => input::validate(args),
        Command::Pack(args) => debimg::pack::pack_image(args),
        Command::Cache { cache_dir, action } => debimg::cache::manage(cache_dir, action),
        Command::Serve { action, args } => serve(action.as_ref(), args).map_err(failed),
        Command::Submit(SubmitArgs {
            spec,
            server,
            name,
            email,
            follow,
            download,
        }) => submit(
            spec,
            server,
            name.as_deref(),
            email.as_deref(),
            *follow,
            download.as_deref(),
        ),
        Command::Jobs { server, action } => jobs(server, action),
        Command::Worker(WorkerArgs {
            server,
            token,
            token_file,
            amqp,
            amqp_file,
            name,
            cache_dir,
            build_dir,
            isolation,
            allow_plain_http,
        }) => {
            if !nix::unistd::geteuid().is_root() {
                return Err(failed(anyhow::anyhow!(
                    "a worker builds as root: run `debimg worker` as root"
                )));
            }
            let (token, amqp) =
                debimg::service::worker::secrets(token, token_file, amqp, amqp_file)
                    .map_err(failed)?;
            debimg::service::worker::run(debimg::service::worker::WorkerConfig {
                server: server.clone(),
                token,
                amqp,
                name: name
                    .clone()
                    .unwrap_or_else(debimg::service::worker::default_name),
                cache_dir: cache_dir.clone(),
                build_dir: build_dir.clone(),
                debimg: std::env::current_exe().map_err(|e| failed(e.into()))?,
                isolation: *isolation,
                allow_plain_http: *allow_plain_http,
            })
            .map_err(failed)
        }
        Command::BootTest(args) => debimg::boottest::boot_test(args),
        Command::Plan(args) => input::print_plan(args),
        Command::Build(args) => job::build(args, !cli.quiet),
        Command::Verify(args) => debimg::verify::verify(args, !cli.quiet),
        Command::Lock(args) => job::lock(args, !cli.quiet),
        Command::VmImage(args) => job::vm_image(args, !cli.quiet),
        Command::VmProxy { allow } => debimg::vm::egress::serve_one(allow).map_err(failed),
    }
}

fn serve(action: Option<&ServeAction>, args: &ServeArgs) -> anyhow::Result<()> {
    use debimg::service::store::Store;
    let open = |dir: &std::path::Path| -> anyhow::Result<Store> {
        debimg::service::prepare_state_dir(dir)?;
        Store::open(dir)
    };
    match action {
        Some(ServeAction::Token { action }) => match action {
            TokenAction::Add {
                name,
                role,
                admin,
                state_dir,
            } => {
                let role = if *admin {
                    debimg::service::store::Role::Admin
                } else {
                    *role
                };
                anyhow::ensure!(
                    !name.is_empty() && name.len() <= 64 && !name.chars().any(char::is_control),
                    "a token's name is 1 to 64 characters, without control characters"
                );
                let token = open(state_dir)?.add_token(name, role)?;
                println!("{token}");
                Ok(())
            }
            TokenAction::List { state_dir } => {
                for t in open(state_dir)?.tokens()? {
                    println!("{}\t{}\t{}", t.name, t.role.as_str(), t.created);
                }
                Ok(())
            }
            TokenAction::Remove { name, state_dir } => {
                if !open(state_dir)?.remove_token(name)? {
                    anyhow::bail!("there is no token named `{name}`");
                }
                Ok(())
            }
        },
        None => {
            if args.local_workers > 0 && !nix::unistd::geteuid().is_root() {
                anyhow::bail!(
                    "local workers build as root: run `debimg serve` as root, or with \
                     --local-workers 0 and workers elsewhere"
                );
            }
            let config = debimg::service::Config {
                listen: args.listen.clone(),
                state_dir: args.state_dir.clone(),
                local_workers: args.local_workers,
                post_creation: args.post_creation.clone(),
                cache_dir: args.cache_dir.clone(),
                build_dir: args.build_dir.clone(),
                max_spec_bytes: args.max_spec_bytes,
                limits: debimg::service::store::Limits {
                    queued: Some(args.max_queued),
                    running: Some(args.max_running),
                    stored_bytes: Some(args.max_stored),
                    jobs: Some(args.max_jobs),
                },
                max_attempts: args.max_attempts.max(1),
                debimg: std::env::current_exe()?,
                lease_secs: args.lease_secs,
                amqp: args.amqp.clone(),
                max_streams: args.max_streams,
                isolation: args.isolation,
                post_creation_timeout: std::time::Duration::from_secs(args.post_creation_timeout),
                max_upload_bytes: args.max_upload,
                keep_jobs: (args.keep_jobs > 0)
                    .then(|| std::time::Duration::from_secs(args.keep_jobs * 86400)),
            };
            debimg::service::http::serve(config)
        }
    }
}

/// Ends the process with `code` when it is not 0 (a job's outcome, already reported).
fn exit_with(code: u8) -> Result<(), Error> {
    if code == 0 {
        return Ok(());
    }
    let _ = std::io::stdout().flush();
    std::process::exit(code.into());
}

fn submit(
    spec: &std::path::Path,
    server: &ServerArgs,
    name: Option<&str>,
    email: Option<&str>,
    follow: bool,
    download: Option<&std::path::Path>,
) -> Result<(), Error> {
    use debimg::service::client::{Client, exit_code};
    let client = Client::new(&server.server, &server.token).map_err(failed)?;
    let text = debimg::spec::Spec::read_text(spec)?;
    let job = client.submit(&text, name, email).map_err(failed)?;
    let id = job["id"].as_str().unwrap_or_default().to_string();
    println!("{id}");
    if !follow && download.is_none() {
        return Ok(());
    }
    let job = if follow {
        client.follow(&id, &mut std::io::stderr()).map_err(failed)?
    } else {
        wait_for(&client, &id).map_err(failed)?
    };
    report_end(&job);
    if let Some(dir) = download
        && job["state"] == "succeeded"
    {
        for p in client.download(&id, dir).map_err(failed)? {
            println!("{}", p.display());
        }
    }
    exit_with(exit_code(&job))
}

/// Polls job `id` until it ends.
fn wait_for(
    client: &debimg::service::client::Client,
    id: &str,
) -> anyhow::Result<serde_json::Value> {
    loop {
        let job = client.job(id)?;
        if matches!(
            job["state"].as_str(),
            Some("succeeded" | "failed" | "cancelled")
        ) {
            return Ok(job);
        }
        std::thread::sleep(std::time::Duration::from_secs(2));
    }
}

/// Says on stderr how a job ended, with its error.
fn report_end(job: &serde_json::Value) {
    let state = job["state"].as_str().unwrap_or("?");
    let id = job["id"].as_str().unwrap_or("?");
    match state {
        "failed" => {
            let e = &job["error"];
            eprintln!(
                "job {id} failed{}: {}",
                e["stage"]
                    .as_str()
                    .map(|s| format!(" in stage `{s}`"))
                    .unwrap_or_default(),
                e["message"].as_str().unwrap_or("(no message)")
            );
        }
        _ => eprintln!("job {id} {state}"),
    }
}

fn jobs(server: &ServerArgs, action: &JobsAction) -> Result<(), Error> {
    use debimg::service::client::{Client, exit_code};
    let client = Client::new(&server.server, &server.token).map_err(failed)?;
    let pretty = |v: &serde_json::Value| serde_json::to_string_pretty(v).unwrap_or_default();
    match action {
        JobsAction::List { state, json } => {
            let jobs = client.jobs(state.as_deref()).map_err(failed)?;
            if *json {
                println!("{}", pretty(&serde_json::Value::Array(jobs)));
            } else {
                for j in jobs {
                    let s = |k: &str| j[k].as_str().unwrap_or("-").to_string();
                    println!(
                        "{}\t{}\t{}\t{}\t{}",
                        s("id"),
                        s("state"),
                        s("stage"),
                        s("created"),
                        s("name")
                    );
                }
            }
        }
        JobsAction::Show { id } => println!("{}", pretty(&client.job(id).map_err(failed)?)),
        JobsAction::Log { id, follow } => {
            if *follow {
                let job = client.follow(id, &mut std::io::stdout()).map_err(failed)?;
                report_end(&job);
                return exit_with(exit_code(&job));
            }
            let log = client.log(id).map_err(failed)?;
            let mut out = std::io::stdout();
            // On a terminal, what the build printed cannot drive it; a pipe gets the bytes.
            let shown = if std::io::IsTerminal::is_terminal(&out) {
                debimg::service::client::for_terminal(&String::from_utf8_lossy(&log)).into_bytes()
            } else {
                log
            };
            out.write_all(&shown).map_err(|e| failed(e.into()))?;
        }
        JobsAction::Cancel { id } => {
            let job = client.cancel(id).map_err(failed)?;
            eprintln!("job {id} {}", job["state"].as_str().unwrap_or("?"));
        }
        JobsAction::Delete { id } => {
            client.delete(id).map_err(failed)?;
            eprintln!("job {id} deleted");
        }
        JobsAction::Download { id, dir } => {
            for p in client.download(id, dir).map_err(failed)? {
                println!("{}", p.display());
            }
        }
    }
    Ok(())
}
