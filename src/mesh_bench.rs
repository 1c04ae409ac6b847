//! `kermail mesh-bench` (hidden): bulk throughput and round-trip time between two processes,
//! through the kermail mesh or through plain TCP, for `scripts/bench/mesh`.
//!
//! `serve` waits for one client; `run` connects, sends `--bytes` in messages of
//! `--message-bytes` one way, then asks the server how much it got (the answer comes after the
//! last byte), then makes `--pings` sequential small request/response round trips. It prints
//! one line: `transport=mesh bytes=N secs=S throughput_mbit=X rtt_p50_us=Y rtt_p99_us=Z`.
//!
//! The plain TCP transport uses the same pattern over one TCP connection (TCP_NODELAY, a 1-byte
//! kind and 4-byte length before each message), so it can run over a veth or a tinc tunnel.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use bytes::Bytes;
use kermail_cluster::mesh::{Channel, Identity, LinkState, Member, Mesh, MeshConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};

/// How long `run` waits for the link or connection to come up.
const CONNECT_DEADLINE: Duration = Duration::from_secs(30);
/// How long one round trip or the final byte count may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// Bytes of each ping request and answer.
const PING_BYTES: usize = 64;
/// Largest plain-TCP message accepted by the server.
const MAX_PLAIN_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
/// Buffer of the plain-TCP reader and writer.
const PLAIN_BUFFER_BYTES: usize = 256 * 1024;

const PLAIN_BULK: u8 = 0;
const PLAIN_COUNT: u8 = 1;
const PLAIN_PING: u8 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    Mesh,
    Tcp,
}

#[derive(Debug, clap::Args)]
pub struct MeshBenchArgs {
    #[command(subcommand)]
    pub command: MeshBenchCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum MeshBenchCommand {
    /// Write a new key file and print its public key.
    Keygen {
        #[arg(long)]
        key: PathBuf,
    },
    /// Wait for one client and answer it until it disconnects (tcp) or forever (mesh).
    Serve {
        #[arg(long, value_enum, default_value = "mesh")]
        transport: Transport,
        #[arg(long)]
        listen: SocketAddr,
        /// This side's key file (mesh).
        #[arg(long)]
        key: Option<PathBuf>,
        /// The client's public key, base64 (mesh).
        #[arg(long)]
        peer_key: Option<String>,
    },
    /// Measure against a server.
    Run {
        #[arg(long, value_enum, default_value = "mesh")]
        transport: Transport,
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long)]
        key: Option<PathBuf>,
        /// The server's public key, base64 (mesh).
        #[arg(long)]
        peer_key: Option<String>,
        /// Bulk bytes to send.
        #[arg(long, default_value_t = 500_000_000)]
        bytes: u64,
        /// Size of each bulk message.
        #[arg(long, default_value_t = 1 << 20)]
        message_bytes: usize,
        /// Sequential round trips to time.
        #[arg(long, default_value_t = 1000)]
        pings: usize,
    },
}

/// Runs the subcommand on its own runtime.
pub fn main(args: MeshBenchArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        match args.command {
            MeshBenchCommand::Keygen { key } => {
                println!("{}", kermail_cluster::mesh::keygen(&key)?);
                Ok(())
            }
            MeshBenchCommand::Serve {
                transport: Transport::Tcp,
                listen,
                ..
            } => serve_tcp(listen).await,
            MeshBenchCommand::Serve {
                transport: Transport::Mesh,
                listen,
                key,
                peer_key,
            } => {
                let (key, peer_key) = mesh_keys(key, peer_key)?;
                serve_mesh(listen, &key, &peer_key).await
            }
            MeshBenchCommand::Run {
                transport,
                connect,
                key,
                peer_key,
                bytes,
                message_bytes,
                pings,
            } => {
                if message_bytes == 0 || message_bytes > MAX_PLAIN_MESSAGE_BYTES {
                    bail!("--message-bytes must be between 1 and {MAX_PLAIN_MESSAGE_BYTES}");
                }
                let report = match transport {
                    Transport::Tcp => run_tcp(connect, bytes, message_bytes, pings).await?,
                    Transport::Mesh => {
                        let (key, peer_key) = mesh_keys(key, peer_key)?;
                        run_mesh(connect, &key, &peer_key, bytes, message_bytes, pings).await?
                    }
                };
                report.print(transport, bytes);
                Ok(())
            }
        }
    })
}

fn mesh_keys(key: Option<PathBuf>, peer_key: Option<String>) -> anyhow::Result<(PathBuf, String)> {
    match (key, peer_key) {
        (Some(key), Some(peer_key)) => Ok((key, peer_key)),
        _ => bail!("the mesh transport needs --key and --peer-key"),
    }
}

struct Report {
    bulk: Duration,
    rtts_us: Vec<u64>,
}

impl Report {
    fn print(mut self, transport: Transport, bytes: u64) {
        self.rtts_us.sort_unstable();
        let pick = |q: usize| {
            if self.rtts_us.is_empty() {
                0
            } else {
                self.rtts_us[(self.rtts_us.len() * q / 100).min(self.rtts_us.len() - 1)]
            }
        };
        let secs = self.bulk.as_secs_f64();
        let mbit = if secs > 0.0 {
            bytes as f64 * 8.0 / secs / 1e6
        } else {
            0.0
        };
        let name = match transport {
            Transport::Mesh => "mesh",
            Transport::Tcp => "tcp",
        };
        println!(
            "transport={name} bytes={bytes} secs={secs:.3} throughput_mbit={mbit:.0} rtt_p50_us={} rtt_p99_us={}",
            pick(50),
            pick(99)
        );
    }
}

fn bench_config(listen: Vec<SocketAddr>) -> MeshConfig {
    MeshConfig {
        listen,
        cluster_id: "mesh-bench".into(),
        ..MeshConfig::default()
    }
}

fn members(server_key: &str, server_addr: Vec<SocketAddr>, client_key: &str) -> Vec<Member> {
    vec![
        Member {
            name: "server".into(),
            site: "bench".into(),
            public_key: server_key.into(),
            addrs: server_addr,
        },
        Member {
            name: "client".into(),
            site: "bench".into(),
            public_key: client_key.into(),
            addrs: Vec::new(),
        },
    ]
}

async fn serve_mesh(listen: SocketAddr, key: &Path, peer_key: &str) -> anyhow::Result<()> {
    let identity = Identity::load(key)?;
    let members = members(&identity.public_key_base64(), Vec::new(), peer_key);
    let mesh = Mesh::start(bench_config(vec![listen]), identity, members).await?;
    let mut raft = mesh.incoming(Channel::Raft).context("raft receiver")?;
    let mut bulk = mesh.incoming(Channel::Bulk).context("bulk receiver")?;
    tokio::spawn(async move {
        while let Some(ping) = raft.recv().await {
            if let Some(responder) = ping.responder {
                let _ = responder.respond(ping.body).await;
            }
        }
    });
    let mut received = 0u64;
    while let Some(message) = bulk.recv().await {
        received += message.body.len() as u64;
        if let Some(responder) = message.responder {
            responder
                .respond(Bytes::copy_from_slice(&received.to_be_bytes()))
                .await?;
            received = 0;
        }
    }
    Ok(())
}

async fn run_mesh(
    connect: SocketAddr,
    key: &Path,
    peer_key: &str,
    bytes: u64,
    message_bytes: usize,
    pings: usize,
) -> anyhow::Result<Report> {
    let identity = Identity::load(key)?;
    let members = members(peer_key, vec![connect], &identity.public_key_base64());
    let mesh = Mesh::start(bench_config(Vec::new()), identity, members).await?;
    let deadline = Instant::now() + CONNECT_DEADLINE;
    loop {
        let status = mesh.status();
        if status
            .peers
            .iter()
            .any(|p| matches!(p.link, LinkState::Direct { .. }))
        {
            break;
        }
        if Instant::now() >= deadline {
            bail!("no mesh link to {connect}: {:?}", status.peers);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let chunk = Bytes::from(vec![0x5au8; message_bytes]);
    let start = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(message_bytes as u64) as usize;
        mesh.send("server", Channel::Bulk, chunk.slice(..n)).await?;
        left -= n as u64;
    }
    let count = mesh
        .request("server", Channel::Bulk, Bytes::new(), REQUEST_TIMEOUT)
        .await?;
    let bulk = start.elapsed();
    let got = u64::from_be_bytes(count[..].try_into().context("count answer")?);
    if got != bytes {
        bail!("server received {got} bytes of {bytes}");
    }
    let ping = Bytes::from(vec![0x11u8; PING_BYTES]);
    let mut rtts_us = Vec::with_capacity(pings);
    for _ in 0..pings {
        let sent = Instant::now();
        let answer = mesh
            .request("server", Channel::Raft, ping.clone(), REQUEST_TIMEOUT)
            .await?;
        rtts_us.push(sent.elapsed().as_micros() as u64);
        if answer.len() != PING_BYTES {
            bail!("bad ping answer");
        }
    }
    mesh.shutdown();
    Ok(Report { bulk, rtts_us })
}

async fn serve_tcp(listen: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        let (reader, writer) = stream.into_split();
        let mut reader = BufReader::with_capacity(PLAIN_BUFFER_BYTES, reader);
        let mut writer = writer;
        let mut body = vec![0u8; MAX_PLAIN_MESSAGE_BYTES.min(4 << 20)];
        let mut received = 0u64;
        while let Ok(kind) = reader.read_u8().await {
            let len = reader.read_u32().await? as usize;
            if len > MAX_PLAIN_MESSAGE_BYTES {
                bail!("message of {len} bytes");
            }
            if body.len() < len {
                body.resize(len, 0);
            }
            reader.read_exact(&mut body[..len]).await?;
            match kind {
                PLAIN_BULK => received += len as u64,
                PLAIN_COUNT => {
                    writer.write_all(&received.to_be_bytes()).await?;
                    received = 0;
                }
                _ => writer.write_all(&body[..len]).await?,
            }
        }
    }
}

async fn run_tcp(
    connect: SocketAddr,
    bytes: u64,
    message_bytes: usize,
    pings: usize,
) -> anyhow::Result<Report> {
    let stream = tokio::time::timeout(CONNECT_DEADLINE, TcpStream::connect(connect))
        .await
        .context("connect timed out")??;
    stream.set_nodelay(true)?;
    let (mut reader, writer) = stream.into_split();
    let mut writer = BufWriter::with_capacity(PLAIN_BUFFER_BYTES, writer);
    let chunk = vec![0x5au8; message_bytes];
    let start = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(message_bytes as u64) as usize;
        writer.write_u8(PLAIN_BULK).await?;
        writer.write_u32(n as u32).await?;
        writer.write_all(&chunk[..n]).await?;
        left -= n as u64;
    }
    writer.write_u8(PLAIN_COUNT).await?;
    writer.write_u32(0).await?;
    writer.flush().await?;
    let got = tokio::time::timeout(REQUEST_TIMEOUT, reader.read_u64())
        .await
        .context("count timed out")??;
    let bulk = start.elapsed();
    if got != bytes {
        bail!("server received {got} bytes of {bytes}");
    }
    let ping = [0x11u8; PING_BYTES];
    let mut answer = [0u8; PING_BYTES];
    let mut rtts_us = Vec::with_capacity(pings);
    for _ in 0..pings {
        let sent = Instant::now();
        writer.write_u8(PLAIN_PING).await?;
        writer.write_u32(PING_BYTES as u32).await?;
        writer.write_all(&ping).await?;
        writer.flush().await?;
        tokio::time::timeout(REQUEST_TIMEOUT, reader.read_exact(&mut answer))
            .await
            .context("ping timed out")??;
        rtts_us.push(sent.elapsed().as_micros() as u64);
    }
    Ok(Report { bulk, rtts_us })
}
