//! Mesh tests over real sockets on 127.0.0.1: the acceptance list of issue 3.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::handshake::{HandshakeParams, Initiator};
use super::node::{read_handshake_frame, write_handshake_frame};
use super::*;

const WAIT: Duration = Duration::from_secs(15);

fn test_config() -> MeshConfig {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    MeshConfig {
        listen: vec!["127.0.0.1:0".parse().unwrap()],
        cluster_id: "test".into(),
        keepalive_interval_ms: 100,
        dead_peer_timeout_ms: 1_500,
        connect_timeout_ms: 500,
        handshake_timeout_ms: 1_000,
        backoff_initial_ms: 50,
        backoff_max_ms: 400,
        ..MeshConfig::default()
    }
}

fn member(name: &str, identity: &Identity, addrs: Vec<SocketAddr>) -> Member {
    Member {
        name: name.into(),
        site: format!("site-{name}"),
        public_key: identity.public_key_base64(),
        addrs,
    }
}

fn identity(seed: u8) -> Identity {
    Identity::from_private([seed; 32])
}

async fn start_alone(name: &str, id: &Identity, config: MeshConfig) -> Mesh {
    Mesh::start(config, id.clone(), vec![member(name, id, vec![])])
        .await
        .unwrap()
}

/// Waits until `condition` holds, failing after [`WAIT`].
async fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn link_of(mesh: &Mesh, peer: &str) -> LinkState {
    mesh.status()
        .peers
        .into_iter()
        .find(|p| p.name == peer)
        .map_or(LinkState::Down, |p| p.link)
}

fn peer_status(mesh: &Mesh, peer: &str) -> PeerStatus {
    mesh.status()
        .peers
        .into_iter()
        .find(|p| p.name == peer)
        .unwrap()
}

fn is_direct(state: &LinkState) -> bool {
    matches!(state, LinkState::Direct { .. })
}

/// A TCP proxy in front of a node: the in-test link filter. It can block (close and refuse
/// connections) and flip one bit in the next chunk it forwards from client to server.
struct FaultProxy {
    addr: SocketAddr,
    blocked: Arc<AtomicBool>,
    flip_next: Arc<AtomicBool>,
}

impl FaultProxy {
    async fn start(target: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let blocked = Arc::new(AtomicBool::new(false));
        let flip_next = Arc::new(AtomicBool::new(false));
        let (b, f) = (blocked.clone(), flip_next.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if b.load(Ordering::SeqCst) {
                    continue;
                }
                let Ok(server) = TcpStream::connect(target).await else {
                    continue;
                };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pump(cr, sw, b.clone(), Some(f.clone())));
                tokio::spawn(pump(sr, cw, b.clone(), None));
            }
        });
        FaultProxy {
            addr,
            blocked,
            flip_next,
        }
    }

    fn block(&self, on: bool) {
        self.blocked.store(on, Ordering::SeqCst);
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    blocked: Arc<AtomicBool>,
    flip: Option<Arc<AtomicBool>>,
) {
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let n = match tokio::time::timeout(Duration::from_millis(20), from.read(&mut buffer)).await
        {
            Err(_) if blocked.load(Ordering::SeqCst) => return,
            Err(_) => continue,
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(n)) => n,
        };
        if blocked.load(Ordering::SeqCst) {
            return;
        }
        if let Some(flip) = &flip {
            if flip.swap(false, Ordering::SeqCst) {
                buffer[n - 1] ^= 0x01;
            }
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}

/// Starts named nodes and gives each the full member list; `addr_of(viewer, peer, real_addr)`
/// decides which address a node dials for a peer.
async fn cluster(
    names: &[&str],
    addr_of: impl Fn(&str, &str, SocketAddr) -> Vec<SocketAddr>,
) -> Vec<Mesh> {
    let mut meshes = Vec::new();
    for (i, name) in names.iter().enumerate() {
        meshes.push(start_alone(name, &identity(i as u8 + 1), test_config()).await);
    }
    for (i, viewer) in names.iter().enumerate() {
        let members = names
            .iter()
            .enumerate()
            .map(|(j, peer)| {
                member(
                    peer,
                    &identity(j as u8 + 1),
                    addr_of(viewer, peer, meshes[j].local_addrs()[0]),
                )
            })
            .collect();
        meshes[i].set_members(members).unwrap();
    }
    meshes
}

async fn echo_requests(mesh: &Mesh, channel: Channel) {
    let mut rx = mesh.incoming(channel).unwrap();
    tokio::spawn(async move {
        while let Some(incoming) = rx.recv().await {
            if let Some(responder) = incoming.responder {
                let _ = responder.respond(incoming.body).await;
            }
        }
    });
}

#[tokio::test]
async fn unknown_key_is_refused_before_any_payload() {
    let (a, b, stranger) = (identity(1), identity(2), identity(9));
    let node_b = Mesh::start(
        test_config(),
        b.clone(),
        vec![member("a", &a, vec![]), member("b", &b, vec![])],
    )
    .await
    .unwrap();
    let mut bulk = node_b.incoming(Channel::Bulk).unwrap();
    let mut stream = TcpStream::connect(node_b.local_addrs()[0]).await.unwrap();
    let params = HandshakeParams {
        local_private_key: stranger.private_key(),
        local_name: "a",
        cluster_id: "test",
        psk: None,
    };
    let (_initiator, message) = Initiator::start(params, "b", &b.public_key()).unwrap();
    write_handshake_frame(&mut stream, &message).await.unwrap();
    // Bytes that would be a payload if the link had been accepted.
    let _ = stream
        .write_all(&[
            0, 20, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20,
        ])
        .await;
    // No message 2: the responder closes.
    let mut reply = Vec::new();
    let read = tokio::time::timeout(WAIT, stream.read_to_end(&mut reply))
        .await
        .unwrap();
    assert!(
        read.is_err() || reply.is_empty(),
        "responder answered an unknown key"
    );
    wait_for("refusal", || node_b.status().handshakes_refused == 1).await;
    let refusal = node_b.status().last_refusal.unwrap();
    assert!(refusal.contains("unknown static key"), "{refusal}");
    assert!(bulk.try_recv().is_err());
    assert_eq!(link_of(&node_b, "a"), LinkState::Down);
}

#[tokio::test]
async fn wrong_key_for_a_name_is_refused() {
    let (a, b, c) = (identity(1), identity(2), identity(3));
    let members = |addr_b: Vec<SocketAddr>| {
        vec![
            member("a", &a, vec![]),
            member("b", &b, addr_b),
            member("c", &c, vec![]),
        ]
    };
    let node_b = Mesh::start(test_config(), b.clone(), members(vec![]))
        .await
        .unwrap();
    // c, a member, claims to be a.
    let mut stream = TcpStream::connect(node_b.local_addrs()[0]).await.unwrap();
    let params = HandshakeParams {
        local_private_key: c.private_key(),
        local_name: "a",
        cluster_id: "test",
        psk: None,
    };
    let (_initiator, message) = Initiator::start(params, "b", &b.public_key()).unwrap();
    write_handshake_frame(&mut stream, &message).await.unwrap();
    assert!(
        read_handshake_frame(&mut stream).await.is_err(),
        "responder answered a false name"
    );
    wait_for("refusal", || node_b.status().handshakes_refused == 1).await;
    let refusal = node_b.status().last_refusal.unwrap();
    assert!(
        refusal.contains("static key of member c presented with the name a"),
        "{refusal}"
    );

    // An impostor listening as "b" with another key: a's handshake fails, no link.
    let impostor_key = identity(7);
    let impostor = Mesh::start(
        test_config(),
        impostor_key.clone(),
        vec![member("a", &a, vec![]), member("b", &impostor_key, vec![])],
    )
    .await
    .unwrap();
    let node_a = Mesh::start(test_config(), a.clone(), members(impostor.local_addrs()))
        .await
        .unwrap();
    wait_for("impostor refused", || {
        impostor.status().handshakes_refused >= 1
    })
    .await;
    wait_for("error recorded", || {
        peer_status(&node_a, "b").last_error.is_some()
    })
    .await;
    assert_eq!(link_of(&node_a, "b"), LinkState::Down);
}

#[tokio::test]
async fn flipped_bit_closes_the_link_and_it_comes_back() {
    let node_b = start_alone("b", &identity(2), test_config()).await;
    let proxy = FaultProxy::start(node_b.local_addrs()[0]).await;
    let node_a = start_alone("a", &identity(1), test_config()).await;
    // Only a dials, through the proxy.
    let members = vec![
        member("a", &identity(1), vec![]),
        member("b", &identity(2), vec![proxy.addr]),
    ];
    node_a.set_members(members.clone()).unwrap();
    node_b.set_members(members).unwrap();
    wait_for("link up", || is_direct(&link_of(&node_b, "a"))).await;
    let first_handshake = peer_status(&node_b, "a").last_handshake_unix_ms;
    proxy.flip_next.store(true, Ordering::SeqCst);
    wait_for("corruption detected", || {
        peer_status(&node_b, "a")
            .last_error
            .is_some_and(|e| e.contains("does not decrypt"))
    })
    .await;
    // b registers the new link when it answers the handshake, a when it reads the answer.
    wait_for("link back", || {
        let status = peer_status(&node_b, "a");
        is_direct(&status.link)
            && status.last_handshake_unix_ms > first_handshake
            && is_direct(&link_of(&node_a, "b"))
    })
    .await;
    let mut raft = node_b.incoming(Channel::Raft).unwrap();
    node_a
        .send("b", Channel::Raft, Bytes::from_static(b"after"))
        .await
        .unwrap();
    let got = tokio::time::timeout(WAIT, raft.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&got.body[..], b"after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_message_does_not_delay_raft_messages() {
    let meshes = cluster(&["a", "b"], |_, _, addr| vec![addr]).await;
    let (node_a, node_b) = (&meshes[0], &meshes[1]);
    wait_for("link up", || {
        is_direct(&link_of(node_a, "b")) && is_direct(&link_of(node_b, "a"))
    })
    .await;
    let mut bulk = node_b.incoming(Channel::Bulk).unwrap();
    let mut raft = node_b.incoming(Channel::Raft).unwrap();
    let epoch = Instant::now();
    let big: Bytes = (0..50_000_000u32)
        .map(|i| (i % 251) as u8)
        .collect::<Vec<u8>>()
        .into();
    let sender = node_a.clone();
    let big_copy = big.clone();
    tokio::spawn(async move { sender.send("b", Channel::Bulk, big_copy).await.unwrap() });
    let sender = node_a.clone();
    let done = Arc::new(AtomicBool::new(false));
    let done_flag = done.clone();
    let ticker = tokio::spawn(async move {
        let mut sent = 0u32;
        while !done_flag.load(Ordering::SeqCst) {
            let stamp = epoch.elapsed().as_micros() as u64;
            sender
                .send(
                    "b",
                    Channel::Raft,
                    Bytes::copy_from_slice(&stamp.to_be_bytes()),
                )
                .await
                .unwrap();
            sent += 1;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        sent
    });
    let mut latencies_us = Vec::new();
    let received = loop {
        tokio::select! {
            message = bulk.recv() => break message.unwrap(),
            message = raft.recv() => {
                let message = message.unwrap();
                let stamp = u64::from_be_bytes(message.body[..8].try_into().unwrap());
                latencies_us.push(epoch.elapsed().as_micros() as u64 - stamp);
            }
        }
    };
    let transfer = epoch.elapsed();
    done.store(true, Ordering::SeqCst);
    let sent = ticker.await.unwrap();
    while latencies_us.len() < sent as usize {
        let message = tokio::time::timeout(WAIT, raft.recv())
            .await
            .unwrap()
            .unwrap();
        let stamp = u64::from_be_bytes(message.body[..8].try_into().unwrap());
        latencies_us.push(epoch.elapsed().as_micros() as u64 - stamp);
    }
    assert!(received.body == big, "50 MB message corrupted");
    latencies_us.sort_unstable();
    let p50 = latencies_us[latencies_us.len() / 2];
    let p99 = latencies_us[(latencies_us.len() * 99 / 100).min(latencies_us.len() - 1)];
    let max = latencies_us[latencies_us.len() - 1];
    println!(
        "50 MB in {:.2} s; {} raft messages during it: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        transfer.as_secs_f64(),
        latencies_us.len(),
        p50 as f64 / 1000.0,
        p99 as f64 / 1000.0,
        max as f64 / 1000.0
    );
    assert!(
        latencies_us.len() >= 10,
        "too few raft messages during the transfer"
    );
    assert!(max < 100_000, "a raft message took {max} us");
}

#[tokio::test]
async fn killed_and_restarted_peer_reconnects() {
    let meshes = cluster(&["a", "b"], |_, _, addr| vec![addr]).await;
    let node_a = meshes[0].clone();
    let addr_b = meshes[1].local_addrs()[0];
    wait_for("link up", || is_direct(&link_of(&node_a, "b"))).await;
    drop(meshes);
    wait_for("link down", || link_of(&node_a, "b") == LinkState::Down).await;
    let mut config = test_config();
    config.listen = vec![addr_b];
    let members = vec![
        member("a", &identity(1), vec![node_a.local_addrs()[0]]),
        member("b", &identity(2), vec![addr_b]),
    ];
    let node_b = Mesh::start(config, identity(2), members).await.unwrap();
    echo_requests(&node_b, Channel::Raft).await;
    wait_for("link back", || is_direct(&link_of(&node_a, "b"))).await;
    let answer = node_a
        .request("b", Channel::Raft, Bytes::from_static(b"ping"), WAIT)
        .await
        .unwrap();
    assert_eq!(&answer[..], b"ping");
}

#[tokio::test]
async fn blocked_direct_path_relays_through_third_node_then_returns() {
    // a and c see each other only through proxies, which the test blocks.
    let real = [identity(1), identity(2), identity(3)];
    let mut meshes = Vec::new();
    for (i, name) in ["a", "b", "c"].iter().enumerate() {
        meshes.push(start_alone(name, &real[i], test_config()).await);
    }
    let addr = |i: usize| meshes[i].local_addrs()[0];
    let to_c = FaultProxy::start(addr(2)).await;
    let to_a = FaultProxy::start(addr(0)).await;
    let view = |a_addr: SocketAddr, c_addr: SocketAddr| {
        vec![
            member("a", &real[0], vec![a_addr]),
            member("b", &real[1], vec![addr(1)]),
            member("c", &real[2], vec![c_addr]),
        ]
    };
    meshes[0].set_members(view(addr(0), to_c.addr)).unwrap();
    meshes[1].set_members(view(addr(0), addr(2))).unwrap();
    meshes[2].set_members(view(to_a.addr, addr(2))).unwrap();
    let (node_a, node_c) = (meshes[0].clone(), meshes[2].clone());
    echo_requests(&node_c, Channel::Raft).await;
    wait_for("direct a-c", || {
        is_direct(&link_of(&node_a, "c")) && is_direct(&link_of(&node_c, "a"))
    })
    .await;
    wait_for("b linked", || {
        is_direct(&link_of(&node_a, "b")) && is_direct(&link_of(&node_c, "b"))
    })
    .await;

    to_c.block(true);
    to_a.block(true);
    wait_for("relayed via b", || {
        link_of(&node_a, "c") == LinkState::Relayed { via: "b".into() }
    })
    .await;
    let answer = node_a
        .request("c", Channel::Raft, Bytes::from_static(b"through b"), WAIT)
        .await
        .unwrap();
    assert_eq!(&answer[..], b"through b");
    assert_eq!(
        link_of(&node_c, "a"),
        LinkState::Relayed { via: "b".into() }
    );

    to_c.block(false);
    to_a.block(false);
    wait_for("direct again", || is_direct(&link_of(&node_a, "c"))).await;
    let answer = node_a
        .request("c", Channel::Raft, Bytes::from_static(b"direct"), WAIT)
        .await
        .unwrap();
    assert_eq!(&answer[..], b"direct");
}

#[tokio::test]
async fn pending_invitee_is_accepted_until_withdrawn() {
    let (b, x) = (identity(2), identity(8));
    let node_b = start_alone("b", &b, test_config()).await;
    echo_requests(&node_b, Channel::Control).await;
    let invitee = member("x", &x, vec![]);
    // The invitee knows b (from its invitation) and dials it.
    let node_x = Mesh::start(
        test_config(),
        x.clone(),
        vec![member("b", &b, node_b.local_addrs()), invitee.clone()],
    )
    .await
    .unwrap();
    wait_for("refusal before the invitation", || {
        node_b.status().handshakes_refused >= 1
    })
    .await;
    node_b.set_pending(vec![invitee]).unwrap();
    wait_for("invitee linked", || is_direct(&link_of(&node_x, "b"))).await;
    let status = peer_status(&node_b, "x");
    assert!(status.pending && is_direct(&status.link));
    let answer = node_x
        .request("b", Channel::Control, Bytes::from_static(b"join"), WAIT)
        .await
        .unwrap();
    assert_eq!(&answer[..], b"join");
    node_b.set_pending(vec![]).unwrap();
    wait_for("invitation withdrawn", || {
        link_of(&node_x, "b") == LinkState::Down
    })
    .await;
    assert!(node_b.status().peers.iter().all(|p| p.name != "x"));
}

#[tokio::test]
async fn a_request_fails_with_link_lost_when_the_peer_goes_away() {
    let meshes = cluster(&["a", "b"], |_, _, addr| vec![addr]).await;
    let (node_a, node_b) = (meshes[0].clone(), meshes[1].clone());
    wait_for("link up", || is_direct(&link_of(&node_a, "b"))).await;
    // b takes the request and never answers, like a leader killed while handling it.
    let mut held = node_b.incoming(Channel::Writes).unwrap();
    let long = Duration::from_secs(600);
    let request = tokio::spawn({
        let node_a = node_a.clone();
        async move {
            node_a
                .request("b", Channel::Writes, Bytes::from_static(b"write"), long)
                .await
        }
    });
    let incoming = tokio::time::timeout(WAIT, held.recv())
        .await
        .expect("request delivered")
        .expect("incoming open");
    assert!(incoming.responder.is_some());
    let started = std::time::Instant::now();
    node_b.shutdown();
    drop(meshes);
    let outcome = tokio::time::timeout(WAIT, request)
        .await
        .expect("the request ended long before its own timeout")
        .unwrap();
    assert!(
        matches!(outcome, Err(MeshError::LinkLost(ref peer)) if peer == "b"),
        "{outcome:?}"
    );
    assert!(started.elapsed() < long / 10);
    drop(incoming);
}
