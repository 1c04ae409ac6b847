//! The `kermail` command: `serve` runs a node; every other command talks to a running node
//! through its admin socket.

use std::io::{BufRead, IsTerminal};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand};

use kermail::admin::{client, AdminRequest, AdminResponse};
use kermail::config::Config;

/// Passwords shorter than this are refused before they reach the node (the node checks too).
const MIN_PASSWORD_CHARS: usize = 10;

/// Log filter when KERMAIL_LOG is unset: kermail's own lines at info, openraft's internals
/// (several lines per election and membership step) only when they warn.
const DEFAULT_LOG_FILTER: &str = "info,openraft=warn";

#[derive(Parser)]
#[command(
    name = "kermail",
    version,
    about = "A replicated mail server for small providers"
)]
struct Cli {
    /// Configuration file. Without it: data in ./kermail-data, loopback ports.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node (SMTP, IMAP, admin socket) until SIGTERM or SIGINT.
    Serve {
        /// Only read and check the configuration, then exit.
        #[arg(long)]
        check: bool,
    },
    /// Manage the domains this cluster receives mail for.
    #[command(subcommand)]
    Domain(DomainCommand),
    /// Manage accounts.
    #[command(subcommand)]
    User(UserCommand),
    /// Manage aliases.
    #[command(subcommand)]
    Alias(AliasCommand),
    /// Show the node's role, Raft indexes and store counts.
    Status,
    /// Mesh throughput and latency measurements (scripts/bench/mesh).
    #[command(hide = true)]
    MeshBench(kermail::mesh_bench::MeshBenchArgs),
}

#[derive(Subcommand)]
enum DomainCommand {
    /// Add a local domain.
    Add { domain: String },
    /// Remove a local domain (it must have no accounts or aliases left).
    Remove { domain: String },
    /// List the local domains.
    List,
}

#[derive(Args)]
struct PasswordSource {
    /// Read the password from standard input (first line) instead of prompting.
    #[arg(long)]
    password_stdin: bool,
}

#[derive(Subcommand)]
enum UserCommand {
    /// Create an account (with INBOX, Sent, Drafts, Trash, Junk and Archive).
    Add {
        address: String,
        #[command(flatten)]
        password: PasswordSource,
    },
    /// Change an account's password.
    Passwd {
        address: String,
        #[command(flatten)]
        password: PasswordSource,
    },
    /// Remove an account and all its mail.
    Remove { address: String },
    /// List accounts, of one domain or of all.
    List { domain: Option<String> },
}

#[derive(Subcommand)]
enum AliasCommand {
    /// Deliver mail for SOURCE (in a local domain) to TARGET too.
    Add { source: String, target: String },
    /// Remove one alias target.
    Remove { source: String, target: String },
    /// List aliases, of one domain or of all.
    List { domain: Option<String> },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("kermail: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let config = Config::load(cli.config.as_deref())?;
    let request = match cli.command {
        Command::Serve { check } => {
            if check {
                println!("configuration ok");
                return Ok(ExitCode::SUCCESS);
            }
            serve(config)?;
            return Ok(ExitCode::SUCCESS);
        }
        Command::Domain(DomainCommand::Add { domain }) => AdminRequest::DomainAdd { domain },
        Command::Domain(DomainCommand::Remove { domain }) => AdminRequest::DomainRemove { domain },
        Command::Domain(DomainCommand::List) => AdminRequest::DomainList,
        Command::User(UserCommand::Add { address, password }) => AdminRequest::UserAdd {
            password: read_password(&password, true)?,
            address,
        },
        Command::User(UserCommand::Passwd { address, password }) => AdminRequest::UserPasswd {
            password: read_password(&password, true)?,
            address,
        },
        Command::User(UserCommand::Remove { address }) => AdminRequest::UserRemove { address },
        Command::User(UserCommand::List { domain }) => AdminRequest::UserList { domain },
        Command::Alias(AliasCommand::Add { source, target }) => {
            AdminRequest::AliasAdd { source, target }
        }
        Command::Alias(AliasCommand::Remove { source, target }) => {
            AdminRequest::AliasRemove { source, target }
        }
        Command::Alias(AliasCommand::List { domain }) => AdminRequest::AliasList { domain },
        Command::Status => AdminRequest::Status,
        Command::MeshBench(args) => {
            kermail::mesh_bench::main(args)?;
            return Ok(ExitCode::SUCCESS);
        }
    };
    match client::send(&config.admin_socket_path(), &request)? {
        AdminResponse::Ok { lines } => {
            for line in lines {
                println!("{line}");
            }
            Ok(ExitCode::SUCCESS)
        }
        AdminResponse::Error { message } => {
            eprintln!("kermail: {message}");
            Ok(ExitCode::FAILURE)
        }
    }
}

fn serve(config: Config) -> anyhow::Result<()> {
    init_logging();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let shutdown = tokio_util::sync::CancellationToken::new();
        tokio::spawn(kermail::node::cancel_on_signal(shutdown.clone()));
        kermail::node::run(config, shutdown).await
    })
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KERMAIL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

/// Reads a password from standard input (`--password-stdin`) or from a prompt, twice.
fn read_password(source: &PasswordSource, confirm: bool) -> anyhow::Result<String> {
    let password = if source.password_stdin {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .context("cannot read the password from standard input")?;
        line.trim_end_matches(['\r', '\n']).to_owned()
    } else {
        if !std::io::stdin().is_terminal() {
            bail!("no terminal to prompt for a password: use --password-stdin");
        }
        let first = rpassword::prompt_password("Password: ").context("cannot read the password")?;
        if confirm {
            let second = rpassword::prompt_password("Password (again): ")
                .context("cannot read the password")?;
            if first != second {
                bail!("the two passwords differ");
            }
        }
        first
    };
    if password.chars().count() < MIN_PASSWORD_CHARS {
        bail!("password must be at least {MIN_PASSWORD_CHARS} characters");
    }
    Ok(password)
}
