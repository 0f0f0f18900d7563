//! The L2 chain (an OP Stack chain; anvil `--optimism` here): ledgerflow's reward contracts
//! (`contracts/`) deployed, settled and claimed through alloy.
//!
//! The bindings come from `contracts/artifacts/*.json` (ABI and creation bytecode, exported by
//! `contracts/export.sh` from a forge build and committed). Keys are never read from job files:
//! callers pass a signer they took from the environment (see [`signer_from_env`]).

use std::str::FromStr;

pub use alloy::primitives;
pub use alloy::rpc::types::TransactionRequest;
pub use alloy::signers::local::PrivateKeySigner;

use alloy::network::EthereumWallet;
use alloy::primitives::aliases::{U192, U224, U48};
use alloy::primitives::{Address, B256, U256};
use alloy::providers::{Provider, ProviderBuilder};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// Contract bindings generated from the committed artifacts (the generated code carries the
/// contracts' long parameter lists).
#[allow(clippy::too_many_arguments)]
pub mod bindings {
    alloy::sol!(
        #[sol(rpc)]
        EpochRewards,
        "../../contracts/artifacts/EpochRewards.json"
    );
    alloy::sol!(
        #[sol(rpc)]
        OpenToken,
        "../../contracts/artifacts/OpenToken.json"
    );
    alloy::sol!(
        #[sol(rpc)]
        StakedOpen,
        "../../contracts/artifacts/StakedOpen.json"
    );
    alloy::sol!(
        #[sol(rpc)]
        TimelockController,
        "../../contracts/artifacts/TimelockController.json"
    );
    alloy::sol!(
        #[sol(rpc)]
        RewardGovernor,
        "../../contracts/artifacts/RewardGovernor.json"
    );
    alloy::sol!(
        #[sol(rpc)]
        RewardParams,
        "../../contracts/artifacts/RewardParams.json"
    );
    alloy::sol!(
        #[sol(rpc)]
        DatanetRegistry,
        "../../contracts/artifacts/DatanetRegistry.json"
    );
}

pub mod settlement;

use bindings::{
    DatanetRegistry, EpochRewards, OpenToken, RewardGovernor, RewardParams, StakedOpen,
    TimelockController,
};

/// Where the contracts of one deployment live (what `ledgerflow contracts deploy` prints).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deployment {
    pub chain_id: u64,
    pub deployer: Address,
    pub settler: Address,
    pub token: Address,
    pub staked_token: Address,
    pub timelock: Address,
    pub governor: Address,
    pub reward_params: Address,
    pub datanet_registry: Address,
    pub epoch_rewards: Address,
    /// Block of the last deployment transaction.
    pub block: u64,
}

impl Deployment {
    pub fn read(path: &std::path::Path) -> Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))
    }
}

/// What a deployment starts with.
#[derive(Debug, Clone)]
pub struct DeployOptions {
    /// The account allowed to settle epochs and anchor Datanet roots.
    pub settler: Address,
    /// Tokens minted to `EpochRewards` for rewards (base units).
    pub reward_pool: U256,
    /// Attribution threshold (millionths) and emission per epoch from epoch 0.
    pub attribution_threshold: u64,
    pub emission: U256,
    /// Timelock delay (seconds), governor voting delay and period (blocks).
    pub timelock_delay: u64,
    pub voting_delay: u64,
    pub voting_period: u32,
}

/// A signer from the environment, never from job files or arguments (which end up in shell
/// history and logs): the hex private key in `var`, or else the encrypted JSON keystore (Web3
/// Secret Storage, as `cast wallet import` writes) at the path in `{var}STORE`, unlocked with
/// the password in `{var}STORE_PASSWORD` or in the file named by `{var}STORE_PASSWORD_FILE`.
/// E.g. `LEDGERFLOW_SETTLER_KEY`, or `LEDGERFLOW_SETTLER_KEYSTORE` and
/// `LEDGERFLOW_SETTLER_KEYSTORE_PASSWORD_FILE`.
pub fn signer_from_env(var: &str) -> Result<PrivateKeySigner> {
    if let Ok(key) = std::env::var(var) {
        return PrivateKeySigner::from_str(key.trim())
            .with_context(|| format!("{var} is not a secp256k1 private key"));
    }
    let store_var = format!("{var}STORE");
    let Ok(path) = std::env::var(&store_var) else {
        bail!(
            "set {var} to the signing key (0x… hex), or {store_var} to a keystore file; keys are read from the environment only"
        );
    };
    let password = match std::env::var(format!("{store_var}_PASSWORD")) {
        Ok(p) => p,
        Err(_) => {
            let file_var = format!("{store_var}_PASSWORD_FILE");
            let file = std::env::var(&file_var).with_context(|| {
                format!("set {store_var}_PASSWORD or {file_var} to unlock the keystore {path}")
            })?;
            std::fs::read_to_string(&file)
                .with_context(|| format!("reading the keystore password file {file}"))?
                .trim_end_matches(['\r', '\n'])
                .to_string()
        }
    };
    PrivateKeySigner::decrypt_keystore(&path, password)
        .with_context(|| format!("unlocking the keystore {path} ({store_var})"))
}

fn url(rpc: &str) -> Result<alloy::transports::http::reqwest::Url> {
    rpc.parse()
        .with_context(|| format!("{rpc} is not an RPC URL"))
}

/// A provider at `rpc` that signs with `signer` (nonce, gas and chain id filled in).
fn signing_provider(rpc: &str, signer: PrivateKeySigner) -> Result<impl Provider + Clone> {
    Ok(ProviderBuilder::new()
        .wallet(EthereumWallet::from(signer))
        .connect_http(url(rpc)?))
}

/// Sends a transaction and waits for its receipt; a reverted transaction is an error.
macro_rules! mined {
    ($call:expr, $what:expr) => {{
        let receipt = $call
            .send()
            .await
            .with_context(|| format!("sending {}", $what))?
            .get_receipt()
            .await
            .with_context(|| format!("waiting for {}", $what))?;
        if !receipt.status() {
            bail!(
                "{} reverted in transaction {}",
                $what,
                receipt.transaction_hash
            );
        }
        receipt
    }};
}

/// Deploys the token, its voting wrapper, the timelock and governor, the parameters, the Datanet
/// registry and `EpochRewards`, hands the timelock to the governor, and funds the reward pool.
pub async fn deploy(
    rpc: &str,
    deployer: PrivateKeySigner,
    opts: &DeployOptions,
) -> Result<Deployment> {
    let from = deployer.address();
    let provider = signing_provider(rpc, deployer)?;
    let chain_id = provider.get_chain_id().await.context("eth_chainId")?;
    let token = OpenToken::deploy(&provider, from)
        .await
        .context("deploying OpenToken")?;
    let staked = StakedOpen::deploy(&provider, *token.address())
        .await
        .context("deploying StakedOpen")?;
    let timelock = TimelockController::deploy(
        &provider,
        U256::from(opts.timelock_delay),
        vec![],
        vec![],
        from,
    )
    .await
    .context("deploying TimelockController")?;
    let governor = RewardGovernor::deploy(
        &provider,
        *staked.address(),
        *timelock.address(),
        U48::from(opts.voting_delay),
        opts.voting_period,
    )
    .await
    .context("deploying RewardGovernor")?;
    let proposer = timelock.PROPOSER_ROLE().call().await?;
    let executor = timelock.EXECUTOR_ROLE().call().await?;
    let admin = timelock.DEFAULT_ADMIN_ROLE().call().await?;
    mined!(
        timelock.grantRole(proposer, *governor.address()),
        "granting the proposer role"
    );
    mined!(
        timelock.grantRole(executor, Address::ZERO),
        "opening the executor role"
    );
    mined!(
        timelock.renounceRole(admin, from),
        "renouncing the timelock admin role"
    );
    let params = RewardParams::deploy(
        &provider,
        *timelock.address(),
        U224::from(opts.attribution_threshold),
        U224::from(opts.emission),
    )
    .await
    .context("deploying RewardParams")?;
    let registry = DatanetRegistry::deploy(&provider, opts.settler)
        .await
        .context("deploying DatanetRegistry")?;
    let rewards = EpochRewards::deploy(&provider, *token.address(), opts.settler)
        .await
        .context("deploying EpochRewards")?;
    let funded = mined!(
        token.mint(*rewards.address(), opts.reward_pool),
        "funding the reward pool"
    );
    Ok(Deployment {
        chain_id,
        deployer: from,
        settler: opts.settler,
        token: *token.address(),
        staked_token: *staked.address(),
        timelock: *timelock.address(),
        governor: *governor.address(),
        reward_params: *params.address(),
        datanet_registry: *registry.address(),
        epoch_rewards: *rewards.address(),
        block: funded.block_number.unwrap_or_default(),
    })
}

/// A mined transaction.
#[derive(Debug, Clone, Serialize)]
pub struct Mined {
    pub transaction: B256,
    pub block: u64,
    pub gas_used: u64,
}

impl Mined {
    fn of(receipt: &alloy::rpc::types::TransactionReceipt) -> Self {
        Self {
            transaction: receipt.transaction_hash,
            block: receipt.block_number.unwrap_or_default(),
            gas_used: receipt.gas_used,
        }
    }
}

/// `EpochRewards.settle`: publishes epoch `epoch`'s root; checks the `Settled` event.
#[allow(clippy::too_many_arguments)]
pub async fn settle(
    rpc: &str,
    settler: PrivateKeySigner,
    deployment: &Deployment,
    epoch: u64,
    root: B256,
    data_hash: B256,
    da_commitment: B256,
    total_cumulative: U256,
) -> Result<Mined> {
    let provider = signing_provider(rpc, settler)?;
    let rewards = EpochRewards::new(deployment.epoch_rewards, &provider);
    let total = U192::checked_from_limbs_slice(total_cumulative.as_limbs())
        .filter(|t| U256::from(*t) == total_cumulative)
        .context("the cumulative total does not fit in a uint192")?;
    let last = rewards
        .epoch()
        .call()
        .await
        .context("reading the last settled epoch")?;
    if epoch != last + 1 {
        bail!("epoch {epoch} cannot be settled: the chain's last settled epoch is {last}");
    }
    let receipt = mined!(
        rewards.settle(epoch, root, data_hash, da_commitment, total),
        format!("settle of epoch {epoch}")
    );
    let event = receipt
        .decoded_log::<EpochRewards::Settled>()
        .context("the settle transaction emitted no Settled event")?;
    if event.epoch != epoch || event.root != root {
        bail!(
            "Settled event does not match: epoch {} root {}",
            event.epoch,
            event.root
        );
    }
    Ok(Mined::of(&receipt))
}

/// `EpochRewards.claim` for `account` (sent and paid for by `sender`); returns the amount paid.
pub async fn claim(
    rpc: &str,
    sender: PrivateKeySigner,
    deployment: &Deployment,
    account: Address,
    cumulative: U256,
    proof: Vec<B256>,
) -> Result<(U256, Mined)> {
    let provider = signing_provider(rpc, sender)?;
    let rewards = EpochRewards::new(deployment.epoch_rewards, &provider);
    let call = rewards.claim(account, cumulative, proof);
    // Simulate first: a refusal comes back as the contract's typed error, not a mined revert.
    if let Err(e) = call.call().await {
        bail!("claim for {account} refused: {}", describe(&e));
    }
    let receipt = mined!(call, format!("claim for {account}"));
    let event = receipt
        .decoded_log::<EpochRewards::Claimed>()
        .context("the claim transaction emitted no Claimed event")?;
    Ok((event.amount, Mined::of(&receipt)))
}

/// The reward token balance of `account` and what `EpochRewards` has paid it.
pub async fn reward_status(
    rpc: &str,
    deployment: &Deployment,
    account: Address,
) -> Result<(U256, U256)> {
    let provider = ProviderBuilder::new().connect_http(url(rpc)?);
    let token = OpenToken::new(deployment.token, &provider);
    let rewards = EpochRewards::new(deployment.epoch_rewards, &provider);
    Ok((
        token.balanceOf(account).call().await?,
        rewards.claimed(account).call().await?,
    ))
}

/// A contract error decoded to `EpochRewards`' typed errors where it is one of them.
fn describe(e: &alloy::contract::Error) -> String {
    use EpochRewards::EpochRewardsErrors as E;
    match e.as_decoded_interface_error::<E>() {
        Some(E::NothingToClaim(x)) => format!(
            "NothingToClaim: {} was already paid {} of cumulative {}",
            x.account, x.alreadyClaimed, x.cumulativeAmount
        ),
        Some(E::InvalidProof(x)) => format!(
            "InvalidProof: ({}, {}) is in neither the current nor the previous root",
            x.account, x.cumulativeAmount
        ),
        Some(E::WrongEpoch(x)) => format!("WrongEpoch: expected {}, got {}", x.expected, x.got),
        Some(E::NotSettler(x)) => format!("NotSettler: {}", x.caller),
        Some(E::SafeERC20FailedOperation(x)) => {
            format!("the token transfer failed (token {})", x.token)
        }
        Some(E::CumulativeDecreased(x)) => {
            format!("CumulativeDecreased: from {} to {}", x.previous, x.proposed)
        }
        None => e.to_string(),
    }
}
