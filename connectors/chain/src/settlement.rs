//! Settlement one transaction at a time, journal-friendly: a transaction is built and signed
//! first ([`Chain::sign`], which returns the raw bytes to journal), broadcast after
//! ([`Chain::broadcast`], safe to repeat), and confirmed ([`Chain::confirmed`]); what the chain
//! already shows (the last settled epoch, a `Settled` event, a Datanet's anchored root) is
//! read before acting, so a restarted settler never sends what was already done.

use std::time::{Duration, Instant};

use alloy::consensus::TxEnvelope;
use alloy::eips::eip2718::Encodable2718;
use alloy::eips::{BlockId, BlockNumberOrTag};
use alloy::network::{EthereumWallet, NetworkTransactionBuilder, TransactionBuilder};
use alloy::primitives::aliases::{U192, U224};
use alloy::primitives::{address, Address, Bytes, B256, U256};
use alloy::providers::{Provider, ProviderBuilder, RootProvider};
use alloy::rpc::types::{Filter, TransactionReceipt, TransactionRequest};
use alloy::signers::local::PrivateKeySigner;
use alloy::sol_types::{SolCall, SolEvent};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::bindings::{DatanetRegistry, EpochRewards, RewardParams};
use crate::Deployment;

alloy::sol! {
    /// The OP Stack's L1 attributes predeploy (Ecotone and later).
    #[sol(rpc)]
    interface L1Block {
        function basefee() external view returns (uint256);
        function blobBaseFee() external view returns (uint256);
        function baseFeeScalar() external view returns (uint32);
        function blobBaseFeeScalar() external view returns (uint32);
    }
}

/// Where OP Stack chains keep `L1Block`.
pub const L1_BLOCK: Address = address!("4200000000000000000000000000000000000015");

/// A block that reads are pinned to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinnedBlock {
    pub number: u64,
    pub hash: B256,
    pub timestamp: u64,
}

/// The reward parameters in force for an epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Params {
    /// Attribution threshold, in millionths of an output's attribution.
    pub attribution_threshold: u64,
    /// Tokens emitted for the epoch, in base units.
    pub emission: U256,
}

/// A signed transaction, as journaled before it is broadcast.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedTx {
    pub from: Address,
    pub nonce: u64,
    pub hash: B256,
    pub raw: Bytes,
}

/// What a confirmed transaction cost.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Confirmed {
    pub transaction: B256,
    pub block: u64,
    pub block_hash: B256,
    pub gas_used: u64,
    pub effective_gas_price: u128,
    /// The Fjord estimate of the L1 data fee the transaction pays on an OP Stack chain.
    pub l1_fee: L1Fee,
}

/// The L1 fee parameters of an OP Stack chain (what `L1Block` holds).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct L1FeeParams {
    pub base_fee_scalar: u32,
    pub blob_base_fee_scalar: u32,
    pub l1_base_fee: u128,
    pub blob_base_fee: u128,
}

impl Default for L1FeeParams {
    /// OP Mainnet's scalars after Ecotone, a 1 gwei L1 base fee and a 1 wei blob base fee.
    fn default() -> Self {
        Self {
            base_fee_scalar: 5_227,
            blob_base_fee_scalar: 1_014_213,
            l1_base_fee: 1_000_000_000,
            blob_base_fee: 1,
        }
    }
}

/// A Fjord L1 data-fee estimate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct L1Fee {
    /// FastLZ-compressed length of the signed transaction.
    pub fastlz_size: u32,
    /// Estimated size in bytes (the Fjord linear regression, at least 100).
    pub estimated_size: u64,
    /// The fee in wei.
    pub fee: u128,
    pub params: L1FeeParams,
    /// `l1block` when the parameters came from the chain's `L1Block`, `config` otherwise.
    pub source: String,
}

/// The Fjord L1 fee of a signed transaction `raw`:
/// `estimatedSize · (baseFeeScalar · l1BaseFee · 16 + blobBaseFeeScalar · blobBaseFee) / 10¹²`,
/// with `estimatedSize` (scaled by 10⁶) `max(100·10⁶, 836500 · flzLen − 42585600)`.
pub fn fjord_l1_fee(raw: &[u8], params: L1FeeParams, source: &str) -> L1Fee {
    let scaled = op_alloy_flz::tx_estimated_size_fjord(raw) as u128;
    let per_byte = u128::from(params.base_fee_scalar) * params.l1_base_fee * 16
        + u128::from(params.blob_base_fee_scalar) * params.blob_base_fee;
    L1Fee {
        fastlz_size: op_alloy_flz::flz_compress_len(raw),
        estimated_size: (scaled / 1_000_000) as u64,
        fee: scaled.saturating_mul(per_byte) / 1_000_000_000_000,
        params,
        source: source.to_string(),
    }
}

/// A read-only connection to the chain (transactions are signed locally, see [`Chain::sign`]).
#[derive(Clone)]
pub struct Chain {
    provider: RootProvider,
    pub chain_id: u64,
}

fn u64_of(what: &str, v: U256) -> Result<u64> {
    u64::try_from(v).with_context(|| format!("{what} {v} does not fit in 64 bits"))
}

impl Chain {
    pub async fn connect(rpc: &str) -> Result<Self> {
        let url = rpc
            .parse()
            .with_context(|| format!("{rpc} is not an RPC URL"))?;
        let provider = ProviderBuilder::new()
            .disable_recommended_fillers()
            .connect_http(url);
        let chain_id = provider
            .get_chain_id()
            .await
            .with_context(|| format!("eth_chainId at {rpc}"))?;
        Ok(Self { provider, chain_id })
    }

    /// The block named by `tag` (`finalized`, `safe`, `latest` or a number).
    pub async fn block(&self, tag: &str) -> Result<PinnedBlock> {
        let tag: BlockNumberOrTag = match tag.parse::<u64>() {
            Ok(n) => BlockNumberOrTag::Number(n),
            Err(_) => tag
                .parse()
                .with_context(|| format!("{tag:?} is not a block tag or number"))?,
        };
        let block = self
            .provider
            .get_block_by_number(tag)
            .await
            .with_context(|| format!("eth_getBlockByNumber({tag})"))?
            .with_context(|| format!("the chain has no {tag} block"))?;
        Ok(PinnedBlock {
            number: block.header.number,
            hash: block.header.hash,
            timestamp: block.header.timestamp,
        })
    }

    pub async fn block_number(&self) -> Result<u64> {
        self.provider
            .get_block_number()
            .await
            .context("eth_blockNumber")
    }

    /// The parameters `RewardParams` holds for `epoch`, read at block `at` (by hash).
    pub async fn params_at(&self, d: &Deployment, epoch: u64, at: &PinnedBlock) -> Result<Params> {
        let code = self
            .provider
            .get_code_at(d.reward_params)
            .block_id(BlockId::hash(at.hash))
            .await
            .context("eth_getCode(RewardParams)")?;
        if code.is_empty() {
            bail!(
                "RewardParams {} has no code at block {} ({}): the deployment is not final there yet",
                d.reward_params,
                at.number,
                at.hash
            );
        }
        let params = RewardParams::new(d.reward_params, &self.provider);
        let e = u32::try_from(epoch).context("epoch numbers are 32-bit in RewardParams")?;
        let threshold: U224 = params
            .attributionThreshold(e)
            .block(BlockId::hash(at.hash))
            .call()
            .await
            .context("RewardParams.attributionThreshold")?;
        let emission: U224 = params
            .emission(e)
            .block(BlockId::hash(at.hash))
            .call()
            .await
            .context("RewardParams.emission")?;
        Ok(Params {
            attribution_threshold: u64_of("the attribution threshold", U256::from(threshold))?,
            emission: U256::from(emission),
        })
    }

    /// The last epoch `EpochRewards` settled (0: none).
    pub async fn last_settled_epoch(&self, d: &Deployment) -> Result<u64> {
        EpochRewards::new(d.epoch_rewards, &self.provider)
            .epoch()
            .call()
            .await
            .context("EpochRewards.epoch")
    }

    /// The `Settled` events of `epoch` (one, once it is settled), with their transactions.
    pub async fn settled_events(
        &self,
        d: &Deployment,
        epoch: u64,
    ) -> Result<Vec<(EpochRewards::Settled, B256, u64)>> {
        let filter = Filter::new()
            .address(d.epoch_rewards)
            .event_signature(EpochRewards::Settled::SIGNATURE_HASH)
            .topic1(B256::from(U256::from(epoch)))
            .from_block(d.block.saturating_sub(64));
        let logs = self
            .provider
            .get_logs(&filter)
            .await
            .context("eth_getLogs(Settled)")?;
        logs.into_iter()
            .map(|log| {
                let tx = log.transaction_hash.unwrap_or_default();
                let block = log.block_number.unwrap_or_default();
                let event = log
                    .log_decode::<EpochRewards::Settled>()
                    .context("decoding a Settled event")?;
                Ok((event.inner.data, tx, block))
            })
            .collect()
    }

    /// Whether Datanet `name` is registered in `DatanetRegistry`.
    pub async fn datanet_registered(&self, d: &Deployment, name: &str) -> Result<bool> {
        let id = alloy::primitives::keccak256(name.as_bytes());
        let entry = DatanetRegistry::new(d.datanet_registry, &self.provider)
            .datanets(id)
            .call()
            .await
            .context("DatanetRegistry.datanets")?;
        Ok(entry.owner != Address::ZERO)
    }

    /// The content root anchored for `name` in `epoch` (zero: none).
    pub async fn content_root(&self, d: &Deployment, name: &str, epoch: u64) -> Result<B256> {
        let id = alloy::primitives::keccak256(name.as_bytes());
        DatanetRegistry::new(d.datanet_registry, &self.provider)
            .contentRoots(id, epoch)
            .call()
            .await
            .context("DatanetRegistry.contentRoots")
    }

    /// The next nonce of `from`, counting transactions still pending.
    pub async fn pending_nonce(&self, from: Address) -> Result<u64> {
        self.provider
            .get_transaction_count(from)
            .pending()
            .await
            .context("eth_getTransactionCount")
    }

    /// The nonce of `from` in the latest block (transactions mined).
    pub async fn mined_nonce(&self, from: Address) -> Result<u64> {
        self.provider
            .get_transaction_count(from)
            .await
            .context("eth_getTransactionCount")
    }

    /// Builds and signs `tx` from `signer` with `nonce` (gas estimated, EIP-1559 fees); sends
    /// nothing.
    pub async fn sign(
        &self,
        signer: &PrivateKeySigner,
        tx: TransactionRequest,
        nonce: u64,
    ) -> Result<SignedTx> {
        let from = signer.address();
        let tx = tx
            .with_from(from)
            .with_nonce(nonce)
            .with_chain_id(self.chain_id);
        let gas = self
            .provider
            .estimate_gas(tx.clone())
            .await
            .map_err(|e| anyhow::anyhow!("the transaction would fail: {}", describe_rpc(&e)))?;
        let fees = self
            .provider
            .estimate_eip1559_fees()
            .await
            .context("estimating EIP-1559 fees")?;
        let tx = tx
            .with_gas_limit(gas + gas / 5)
            .with_max_fee_per_gas(fees.max_fee_per_gas)
            .with_max_priority_fee_per_gas(fees.max_priority_fee_per_gas);
        let envelope: TxEnvelope = tx
            .build(&EthereumWallet::from(signer.clone()))
            .await
            .context("signing the transaction")?;
        Ok(SignedTx {
            from,
            nonce,
            hash: *envelope.tx_hash(),
            raw: envelope.encoded_2718().into(),
        })
    }

    /// Broadcasts a signed transaction; broadcasting one the node already has (or mined) is
    /// not an error.
    pub async fn broadcast(&self, tx: &SignedTx) -> Result<()> {
        match self.provider.send_raw_transaction(&tx.raw).await {
            Ok(_) => Ok(()),
            Err(e) => {
                if self
                    .provider
                    .get_transaction_by_hash(tx.hash)
                    .await
                    .ok()
                    .flatten()
                    .is_some()
                {
                    return Ok(());
                }
                Err(anyhow::anyhow!(
                    "broadcasting {}: {}",
                    tx.hash,
                    describe_rpc(&e)
                ))
            }
        }
    }

    /// The receipt of `hash`, if it is mined.
    pub async fn receipt(&self, hash: B256) -> Result<Option<TransactionReceipt>> {
        self.provider
            .get_transaction_receipt(hash)
            .await
            .context("eth_getTransactionReceipt")
    }

    /// Whether the node knows transaction `hash` (pending or mined).
    pub async fn known(&self, hash: B256) -> Result<bool> {
        Ok(self
            .provider
            .get_transaction_by_hash(hash)
            .await
            .context("eth_getTransactionByHash")?
            .is_some())
    }

    /// Waits until `tx` is mined with `confirmations` blocks on top (the receipt's block still
    /// canonical), up to `timeout`; a reverted transaction is an error.
    pub async fn confirmed(
        &self,
        tx: &SignedTx,
        confirmations: u64,
        timeout: Duration,
        l1: L1FeeParams,
    ) -> Result<(TransactionReceipt, Confirmed)> {
        let deadline = Instant::now() + timeout;
        let mut wait = Duration::from_millis(50);
        loop {
            if let Some(r) = self.receipt(tx.hash).await? {
                let block = r.block_number.unwrap_or_default();
                let head = self.block_number().await?;
                if head + 1 >= block + confirmations.max(1) {
                    let canonical = self.block(&block.to_string()).await?;
                    if Some(canonical.hash) == r.block_hash {
                        if !r.status() {
                            bail!("transaction {} reverted in block {block}", tx.hash);
                        }
                        let l1_fee = self.l1_fee(&tx.raw, l1).await?;
                        let confirmed = Confirmed {
                            transaction: tx.hash,
                            block,
                            block_hash: canonical.hash,
                            gas_used: r.gas_used,
                            effective_gas_price: r.effective_gas_price,
                            l1_fee,
                        };
                        return Ok((r, confirmed));
                    }
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "transaction {} not confirmed ({confirmations} confirmations) within {timeout:?}",
                    tx.hash
                );
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(2));
        }
    }

    /// The Fjord L1 fee of `raw`, with the chain's `L1Block` parameters when it has that
    /// predeploy (anvil does not), `fallback` otherwise.
    pub async fn l1_fee(&self, raw: &[u8], fallback: L1FeeParams) -> Result<L1Fee> {
        let code = self
            .provider
            .get_code_at(L1_BLOCK)
            .await
            .context("eth_getCode(L1Block)")?;
        if code.is_empty() {
            return Ok(fjord_l1_fee(raw, fallback, "config"));
        }
        let l1 = L1Block::new(L1_BLOCK, &self.provider);
        let params = L1FeeParams {
            base_fee_scalar: l1.baseFeeScalar().call().await?,
            blob_base_fee_scalar: l1.blobBaseFeeScalar().call().await?,
            l1_base_fee: u128::try_from(l1.basefee().call().await?).unwrap_or(u128::MAX),
            blob_base_fee: u128::try_from(l1.blobBaseFee().call().await?).unwrap_or(u128::MAX),
        };
        Ok(fjord_l1_fee(raw, params, "l1block"))
    }
}

fn describe_rpc<E: std::fmt::Display>(e: &E) -> String {
    e.to_string()
}

fn call_to(to: Address, input: Vec<u8>) -> TransactionRequest {
    TransactionRequest::default()
        .with_to(to)
        .with_input(Bytes::from(input))
}

/// `EpochRewards.settle(epoch, root, dataHash, daCommitment, totalCumulative)`.
pub fn settle_call(
    d: &Deployment,
    epoch: u64,
    root: B256,
    data_hash: B256,
    da_commitment: B256,
    total_cumulative: U256,
) -> Result<TransactionRequest> {
    let total = U192::checked_from_limbs_slice(total_cumulative.as_limbs())
        .filter(|t| U256::from(*t) == total_cumulative)
        .context("the cumulative total does not fit in a uint192")?;
    let call = EpochRewards::settleCall {
        epoch_: epoch,
        root_: root,
        dataHash: data_hash,
        daCommitment: da_commitment,
        totalCumulative_: total,
    };
    Ok(call_to(d.epoch_rewards, call.abi_encode()))
}

/// `DatanetRegistry.register(name)`.
pub fn register_call(d: &Deployment, name: &str) -> TransactionRequest {
    let call = DatanetRegistry::registerCall {
        name: name.to_string(),
    };
    call_to(d.datanet_registry, call.abi_encode())
}

/// `DatanetRegistry.anchor(name, epoch, root, contributions)`.
pub fn anchor_call(
    d: &Deployment,
    name: &str,
    epoch: u64,
    root: B256,
    contributions: u64,
) -> TransactionRequest {
    let call = DatanetRegistry::anchorCall {
        name: name.to_string(),
        epoch,
        root,
        contributions: U256::from(contributions),
    };
    call_to(d.datanet_registry, call.abi_encode())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fjord_fee_follows_the_formula() {
        // Incompressible bytes: FastLZ adds a byte per 32 literals.
        let raw: Vec<u8> = (0..1000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let p = L1FeeParams::default();
        let fee = fjord_l1_fee(&raw, p, "config");
        let scaled = (836_500u128 * u128::from(fee.fastlz_size))
            .saturating_sub(42_585_600)
            .max(100_000_000);
        assert_eq!(fee.estimated_size as u128, scaled / 1_000_000);
        let per_byte = 5_227u128 * 1_000_000_000 * 16 + 1_014_213;
        assert_eq!(fee.fee, scaled * per_byte / 1_000_000_000_000);
        // A tiny transaction pays for the 100-byte minimum.
        let small = fjord_l1_fee(&[0u8; 20], p, "config");
        assert_eq!(small.estimated_size, 100);
        // op-geth's FlzCompressLen of 1000 equal bytes.
        assert_eq!(op_alloy_flz::flz_compress_len(&[1u8; 1000]), 21);
    }
}
