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
    /// Manage DKIM keys (the DNS records to publish, rotation).
    #[command(subcommand)]
    Dkim(kermail::admin::outbound::DkimCommand),
    /// Inspect and steer the outbound queue.
    #[command(subcommand)]
    Queue(kermail::admin::outbound::QueueCommand),
    /// Create this node's mesh key (`node.key` in the data folder) and print its public key.
    Keygen,
    /// The encrypted mesh between nodes.
    #[command(subcommand)]
    Mesh(MeshCommand),
    /// Cluster membership: invite, join, leave, remove, status.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Encrypted backups: now, list, verify, prune, key export.
    #[command(subcommand)]
    Backup(BackupCommand),
    /// Restore a backup: into a fresh data folder (--to), or one account into the running
    /// cluster (--account).
    Restore(RestoreArgs),
    /// Mesh throughput and latency measurements (scripts/bench/mesh).
    #[command(hide = true)]
    MeshBench(kermail::mesh_bench::MeshBenchArgs),
}

/// Where list, verify, prune and restore read: the target and the key.
#[derive(Args)]
struct BackupAccess {
    /// The target (a name from `[[backup.targets]]`); default: the first one.
    #[arg(long)]
    target: Option<String>,
    /// The backup key (as `kermail backup key export` printed it) from this file instead of
    /// the running node.
    #[arg(long, value_name = "PATH")]
    key_file: Option<PathBuf>,
}

#[derive(Subcommand)]
enum BackupCommand {
    /// Back up now (the node's applied state at one Raft index), with a progress bar.
    Now {
        #[arg(long)]
        target: Option<String>,
    },
    /// Backups at a target: id, time, Raft index, messages, bytes new/total.
    List {
        #[command(flatten)]
        access: BackupAccess,
    },
    /// Re-read every chunk of a backup: decryption and hashes.
    Verify {
        id: String,
        #[command(flatten)]
        access: BackupAccess,
    },
    /// Apply the retention of `[backup.retention]`; chunks a kept backup uses stay.
    Prune {
        #[command(flatten)]
        access: BackupAccess,
    },
    /// The backup key.
    #[command(subcommand)]
    Key(BackupKeyCommand),
}

#[derive(Subcommand)]
enum BackupKeyCommand {
    /// Print the backup key (hex) for safekeeping offline: without it no backup can be read.
    Export,
}

#[derive(Args)]
struct RestoreArgs {
    /// The backup id (`kermail backup list`).
    id: String,
    /// A new, empty data folder to restore the whole cluster state into.
    #[arg(long, value_name = "FOLDER", conflicts_with = "account")]
    to: Option<PathBuf>,
    /// Restore this account's mail into the running cluster (as new messages in Restored/DATE).
    #[arg(long, value_name = "ADDRESS")]
    account: Option<String>,
    /// Into this account instead.
    #[arg(long = "as", value_name = "ADDRESS2", requires = "account")]
    as_address: Option<String>,
    /// Only this mailbox.
    #[arg(long, value_name = "NAME", requires = "account")]
    mailbox: Option<String>,
    #[command(flatten)]
    access: BackupAccess,
}

#[derive(Subcommand)]
enum MeshCommand {
    /// Each peer: site, link (direct, relayed via, down), round trip, traffic, last handshake
    /// and error.
    Status {
        /// One line of JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Invite a new node: prints a one-time, expiring token (alone on standard output) to give
    /// to `kermail cluster join` on the new node.
    Invite {
        /// The new node's name.
        name: String,
        /// The new node's site (its failure domain).
        #[arg(long)]
        site: String,
        /// Keep the node a learner (replica without a vote) instead of promoting it.
        #[arg(long)]
        learner: bool,
    },
    /// Join the cluster a token invites this (new, empty, running) node to; returns once the
    /// node is a caught-up member. The token is a secret: it is read from standard input (one
    /// line) or from `--token-file`, never from the command line, where `ps` would show it.
    Join {
        /// Read the token from this file instead of standard input.
        #[arg(long, value_name = "PATH")]
        token_file: Option<PathBuf>,
        /// Refused: a token on the command line is visible to every user of the machine.
        #[arg(hide = true)]
        token_in_argv: Option<String>,
    },
    /// Take this node out of the cluster (hands leadership over first when it leads).
    Leave,
    /// Remove a member that is gone for good.
    Remove { name: String },
    /// Every node (site, role, reachability, indexes, lag) and the site-loss verdict.
    Status {
        /// One line of JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
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
    /// List accounts, of one domain or of all, with their quota usage and limits.
    List { domain: Option<String> },
    /// Show an account's quota and usage; with SIZE (`2G`, `500M`, `100K`, bytes; `0` or
    /// `none`: unlimited; `default`: the configured default) or --messages, set it first.
    Quota {
        address: String,
        size: Option<String>,
        /// The most messages the account may hold (`0` or `none`: unlimited; `default`).
        #[arg(long)]
        messages: Option<String>,
    },
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
    // `domain add` also prints the DNS records to publish for the new domain.
    let zone_for = match &cli.command {
        Command::Domain(DomainCommand::Add { domain }) => Some(domain.clone()),
        _ => None,
    };
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
        Command::User(UserCommand::Quota {
            address,
            size,
            messages,
        }) => AdminRequest::UserQuota {
            address,
            storage: size
                .map(|size| kermail::store::QuotaSetting::parse(&size, true))
                .transpose()
                .map_err(anyhow::Error::msg)?,
            messages: messages
                .map(|count| kermail::store::QuotaSetting::parse(&count, false))
                .transpose()
                .map_err(anyhow::Error::msg)?,
        },
        Command::Alias(AliasCommand::Add { source, target }) => {
            AdminRequest::AliasAdd { source, target }
        }
        Command::Alias(AliasCommand::Remove { source, target }) => {
            AdminRequest::AliasRemove { source, target }
        }
        Command::Alias(AliasCommand::List { domain }) => AdminRequest::AliasList { domain },
        Command::Status => AdminRequest::Status,
        Command::Dkim(command) => AdminRequest::Outbound(command.into()),
        Command::Queue(command) => AdminRequest::Outbound(command.into()),
        Command::Keygen => return keygen(&config),
        Command::Backup(BackupCommand::Now { target }) => return backup_now(&config, target),
        Command::Backup(BackupCommand::Key(BackupKeyCommand::Export)) => {
            AdminRequest::Backup(kermail::admin::backup::BackupRequest::KeyExport)
        }
        Command::Backup(BackupCommand::List { access }) => {
            return backup_offline(&config, &access, kermail::admin::backup::OfflineOp::List)
        }
        Command::Backup(BackupCommand::Verify { id, access }) => {
            return backup_offline(
                &config,
                &access,
                kermail::admin::backup::OfflineOp::Verify { id },
            )
        }
        Command::Backup(BackupCommand::Prune { access }) => {
            return backup_offline(&config, &access, kermail::admin::backup::OfflineOp::Prune)
        }
        Command::Restore(args) => return restore(&config, args),
        Command::Mesh(MeshCommand::Status { json }) => AdminRequest::MeshStatus { json },
        Command::Cluster(ClusterCommand::Invite {
            name,
            site,
            learner,
        }) => {
            eprintln!(
                "kermail: inviting {name} (site {site}{}); the token below is a secret, valid once and for one hour: give it to `kermail cluster join` on the new node on standard input (or with --token-file PATH)",
                if learner { ", as a learner" } else { "" }
            );
            AdminRequest::ClusterInvite {
                name,
                site,
                learner,
            }
        }
        Command::Cluster(ClusterCommand::Join {
            token_file,
            token_in_argv,
        }) => {
            if token_in_argv.is_some() {
                bail!(
                    "the token is a secret and the command line is visible to every user (ps): \
                     pass it on standard input (`kermail cluster join < token`) or with --token-file PATH"
                );
            }
            let token = read_token(token_file.as_deref())?;
            return join(&config, token);
        }
        Command::Cluster(ClusterCommand::Leave) => AdminRequest::ClusterLeave,
        Command::Cluster(ClusterCommand::Remove { name }) => AdminRequest::ClusterRemove { name },
        Command::Cluster(ClusterCommand::Status { json }) => AdminRequest::ClusterStatus { json },
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
            if let Some(domain) = zone_for {
                let advertised =
                    kermail::autoconfig::Advertised::new(&config.autoconfig, &config.node.hostname);
                for line in kermail::autoconfig::zone_lines(&domain, &advertised) {
                    println!("{line}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        AdminResponse::Error { message } => {
            eprintln!("kermail: {message}");
            Ok(ExitCode::FAILURE)
        }
    }
}

/// `kermail keygen`: writes the key file, refusing to overwrite one.
fn keygen(config: &Config) -> anyhow::Result<ExitCode> {
    use std::os::unix::fs::DirBuilderExt;
    let data_dir = &config.node.data_dir;
    if !data_dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(data_dir)
            .with_context(|| format!("cannot create the data folder {}", data_dir.display()))?;
    }
    let path = config.mesh_key_path();
    let public_key = kermail_cluster::mesh::keygen(&path)?;
    eprintln!("kermail: wrote {}; its public key:", path.display());
    println!("{public_key}");
    Ok(ExitCode::SUCCESS)
}

/// How long `cluster join` keeps trying to reach a node that restarts mid-join.
const JOIN_NODE_RESTART_WAIT: std::time::Duration = std::time::Duration::from_secs(120);
/// How often `cluster join` asks the node where the join stands.
const JOIN_POLL: std::time::Duration = std::time::Duration::from_millis(300);

/// Reads an invitation token from `path`, or else from standard input (first line).
fn read_token(path: Option<&std::path::Path>) -> anyhow::Result<String> {
    let text = match path {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the token file {}", path.display()))?,
        None => {
            let stdin = std::io::stdin();
            if stdin.is_terminal() {
                eprintln!("kermail: paste the invitation token, then Enter:");
            }
            let mut line = String::new();
            stdin
                .lock()
                .read_line(&mut line)
                .context("cannot read the token from standard input")?;
            line
        }
    };
    let token = text.lines().map(str::trim).find(|l| !l.is_empty());
    match token {
        Some(token) => Ok(token.to_string()),
        None => bail!("no token given: pass it on standard input or with --token-file PATH"),
    }
}

/// `kermail cluster join < TOKEN`: starts the join, then shows its progress until the node is a
/// caught-up member (exit 0) or the cluster refused it (exit 1).
fn join(config: &Config, token: String) -> anyhow::Result<ExitCode> {
    let socket = config.admin_socket_path();
    match client::send(&socket, &AdminRequest::ClusterJoin { token })? {
        AdminResponse::Ok { lines } => {
            for line in lines {
                eprintln!("kermail: {line}");
            }
        }
        AdminResponse::Error { message } => {
            eprintln!("kermail: {message}");
            return Ok(ExitCode::FAILURE);
        }
    }
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} catching up {bar:40} {pos}/{len} entries {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut unreachable_since: Option<std::time::Instant> = None;
    loop {
        std::thread::sleep(JOIN_POLL);
        let report = match client::send(&socket, &AdminRequest::ClusterJoinStatus) {
            Ok(AdminResponse::Ok { lines }) => {
                unreachable_since = None;
                let line = lines.first().cloned().unwrap_or_default();
                serde_json::from_str::<kermail_cluster::JoinReport>(&line)
                    .context("the node sent a join report this CLI does not understand")?
            }
            Ok(AdminResponse::Error { message }) => {
                bar.abandon();
                eprintln!("kermail: {message}");
                return Ok(ExitCode::FAILURE);
            }
            Err(error) => {
                // The node may be restarting: the join resumes there; keep asking a while.
                let since = *unreachable_since.get_or_insert_with(std::time::Instant::now);
                if since.elapsed() > JOIN_NODE_RESTART_WAIT {
                    bar.abandon();
                    return Err(error.into());
                }
                bar.set_message("(node restarting?)");
                continue;
            }
        };
        if let (Some(last), Some(applied)) = (report.leader_last_index, report.applied_index) {
            bar.set_length(last.max(applied));
            bar.set_position(applied);
        }
        match report.phase {
            kermail_cluster::JoinPhase::Done => {
                bar.finish_and_clear();
                eprintln!(
                    "kermail: {} (site {}) is a member of the cluster",
                    report.name, report.site
                );
                return Ok(ExitCode::SUCCESS);
            }
            kermail_cluster::JoinPhase::Failed => {
                bar.abandon();
                eprintln!(
                    "kermail: the join failed: {}",
                    report.error.unwrap_or_else(|| "no reason given".to_owned())
                );
                return Ok(ExitCode::FAILURE);
            }
            _ => {
                bar.set_message(report.error.unwrap_or_default());
                bar.tick();
            }
        }
    }
}

/// How often `backup now` asks the node how far the backup is.
const BACKUP_POLL: std::time::Duration = std::time::Duration::from_millis(200);

/// `kermail backup now`: starts the backup on the node and shows its progress.
fn backup_now(config: &Config, target: Option<String>) -> anyhow::Result<ExitCode> {
    use kermail::admin::backup::BackupRequest;
    let socket = config.admin_socket_path();
    let job = match client::send(
        &socket,
        &AdminRequest::Backup(BackupRequest::Now { target }),
    )? {
        AdminResponse::Ok { lines } => lines
            .first()
            .and_then(|l| l.parse::<u64>().ok())
            .context("the node did not answer with a job number")?,
        AdminResponse::Error { message } => bail!("{message}"),
    };
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {bytes}/{total_bytes} {msg} {binary_bytes_per_sec} ETA {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    if !std::io::stderr().is_terminal() {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    loop {
        let report = match client::send(
            &socket,
            &AdminRequest::Backup(BackupRequest::Job { id: job }),
        )? {
            AdminResponse::Ok { lines } => serde_json::from_str::<kermail::backup::ProgressReport>(
                lines.first().map(String::as_str).unwrap_or(""),
            )
            .context("the node sent a progress report this CLI does not understand")?,
            AdminResponse::Error { message } => bail!("{message}"),
        };
        bar.set_length(report.bytes_total);
        bar.set_position(report.bytes_done);
        bar.set_message(format!(
            "bodies {}/{} sent {} B",
            report.bodies_done, report.bodies_total, report.bytes_sent
        ));
        match report.done {
            Some(Ok(summary)) => {
                bar.finish_and_clear();
                println!("{summary}");
                return Ok(ExitCode::SUCCESS);
            }
            Some(Err(error)) => {
                bar.abandon();
                bail!("{error}");
            }
            None => std::thread::sleep(BACKUP_POLL),
        }
    }
}

/// The backup key: from `--key-file`, or from the running node.
fn backup_key(config: &Config, access: &BackupAccess) -> anyhow::Result<kermail::backup::Keys> {
    let text = match &access.key_file {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the key file {}", path.display()))?,
        None => {
            let request = AdminRequest::Backup(kermail::admin::backup::BackupRequest::KeyExport);
            match client::send(&config.admin_socket_path(), &request)
                .context("no --key-file given and the node cannot give the key")?
            {
                AdminResponse::Ok { lines } => lines.first().cloned().unwrap_or_default(),
                AdminResponse::Error { message } => bail!("{message}"),
            }
        }
    };
    let key = kermail::backup::parse_key(&text).map_err(anyhow::Error::msg)?;
    Ok(kermail::backup::Keys::derive(&key))
}

fn offline_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    kermail::tls::install_crypto_provider();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn backup_offline(
    config: &Config,
    access: &BackupAccess,
    op: kermail::admin::backup::OfflineOp,
) -> anyhow::Result<ExitCode> {
    let target_config = config
        .backup
        .target(access.target.as_deref())
        .map_err(anyhow::Error::msg)?;
    // A node target is reached over the mesh: the running node does it.
    if target_config.kind == kermail::backup::TargetKind::Node {
        let request = AdminRequest::Backup(kermail::admin::backup::BackupRequest::Offline {
            target: access.target.clone(),
            what: op,
        });
        return match client::send(&config.admin_socket_path(), &request)? {
            AdminResponse::Ok { lines } => {
                for line in lines {
                    println!("{line}");
                }
                Ok(ExitCode::SUCCESS)
            }
            AdminResponse::Error { message } => bail!("{message}"),
        };
    }
    let keys = backup_key(config, access)?;
    let target = kermail::backup::target::open(target_config, None)?;
    let runtime = offline_runtime()?;
    let bar = indicatif::ProgressBar::new(0);
    if !std::io::stderr().is_terminal() {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let on_body = |done: u64, total: u64| {
        bar.set_length(total);
        bar.set_position(done);
    };
    let lines = runtime
        .block_on(kermail::admin::backup::run_offline(
            target.as_ref(),
            &keys,
            &config.backup,
            target_config,
            op,
            &on_body,
        ))
        .map_err(anyhow::Error::msg)?;
    bar.finish_and_clear();
    for line in lines {
        println!("{line}");
    }
    Ok(ExitCode::SUCCESS)
}

/// `kermail restore ID --to FOLDER` (offline), or `--account` (into the running cluster).
fn restore(config: &Config, args: RestoreArgs) -> anyhow::Result<ExitCode> {
    let Some(folder) = args.to.clone() else {
        let Some(account) = args.account else {
            bail!("say where to restore: --to FOLDER or --account ADDRESS");
        };
        // Into the running cluster: the node holds the key and does it.
        let request = AdminRequest::Backup(kermail::admin::backup::BackupRequest::RestoreAccount {
            id: args.id,
            target: args.access.target,
            account,
            as_address: args.as_address,
            mailbox: args.mailbox,
        });
        return match client::send(&config.admin_socket_path(), &request)? {
            AdminResponse::Ok { lines } => {
                for line in lines {
                    println!("{line}");
                }
                Ok(ExitCode::SUCCESS)
            }
            AdminResponse::Error { message } => bail!("{message}"),
        };
    };
    let folder = if folder.is_absolute() {
        folder
    } else {
        std::env::current_dir()
            .context("cannot read the current folder")?
            .join(folder)
    };
    backup_offline(
        config,
        &args.access,
        kermail::admin::backup::OfflineOp::RestoreTo {
            id: args.id,
            folder,
        },
    )
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
