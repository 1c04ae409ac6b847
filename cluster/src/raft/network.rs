//! The network of a cluster of one voter: there is nobody to talk to.
//!
//! Every RPC answers `Unreachable`, which openraft treats as a down peer (back off, retry
//! quietly). A lone voter never sends any; the factory exists so that the rest of the wiring is
//! the one a real cluster uses. Issue 4 replaces this file with a factory whose clients send
//! the RPCs over the Noise mesh.

use openraft::error::{InstallSnapshotError, RPCError, RaftError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};

use super::types::{NodeId, NodeInfo, TypeConfig};

/// The error every [`UnreachableClient`] RPC carries.
#[derive(Debug, thiserror::Error)]
#[error("no network: node {target} ({name}) cannot be reached from a one-voter cluster")]
pub struct NoNetwork {
    target: NodeId,
    name: String,
}

/// The network factory of a one-voter cluster.
#[derive(Debug, Clone, Default)]
pub struct UnreachableNetwork;

/// A client to a peer that cannot be reached.
#[derive(Debug, Clone)]
pub struct UnreachableClient {
    target: NodeId,
    node: NodeInfo,
}

impl UnreachableClient {
    fn unreachable<E: std::error::Error>(&self) -> RPCError<NodeId, NodeInfo, E> {
        let error = NoNetwork {
            target: self.target,
            name: self.node.name.clone(),
        };
        RPCError::Unreachable(Unreachable::new(&error))
    }
}

impl RaftNetworkFactory<TypeConfig> for UnreachableNetwork {
    type Network = UnreachableClient;

    async fn new_client(&mut self, target: NodeId, node: &NodeInfo) -> Self::Network {
        UnreachableClient {
            target,
            node: node.clone(),
        }
    }
}

impl RaftNetwork<TypeConfig> for UnreachableClient {
    #[tracing::instrument(level = "debug", skip_all, fields(target = self.target))]
    async fn append_entries(
        &mut self,
        _rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, NodeInfo, RaftError<NodeId>>> {
        Err(self.unreachable())
    }

    #[tracing::instrument(level = "debug", skip_all, fields(target = self.target))]
    async fn install_snapshot(
        &mut self,
        _rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, NodeInfo, RaftError<NodeId, InstallSnapshotError>>,
    > {
        Err(self.unreachable())
    }

    #[tracing::instrument(level = "debug", skip_all, fields(target = self.target))]
    async fn vote(
        &mut self,
        _rpc: VoteRequest<NodeId>,
        _option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, NodeInfo, RaftError<NodeId>>> {
        Err(self.unreachable())
    }
}
