// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {MerkleProof} from "@openzeppelin/contracts/utils/cryptography/MerkleProof.sol";

/// @title Cumulative reward settlement, one Merkle root per epoch.
/// @notice Every reward epoch the settler publishes the root of a tree whose leaves are
/// `(account, cumulativeAmount)` — all an account has earned to date — built as OpenZeppelin's
/// StandardMerkleTree from the npm merkle-tree package (`ledgerflow rewards tree`). An account claims
/// whenever it likes against the current or the previous root and is paid what it has not
/// claimed yet, so a root replaces the last one and no epoch needs its own claim.
/// The epoch's full data lives on EigenDA: `dataHash` (keccak256 of the published payload) and
/// `daCommitment` (keccak256 of the DA certificate) are emitted with the root.
contract EpochRewards {
    using SafeERC20 for IERC20;

    /// The reward token ($OPEN).
    IERC20 public immutable token;
    /// The only account that may settle.
    address public immutable settler;

    /// The last settled epoch (0: none yet), and the sum of all cumulative amounts of its tree
    /// (what the contract must have paid or hold: the `Claimed` amounts plus its token balance);
    /// one storage slot, so a steady-state `settle` writes three.
    uint64 public epoch;
    uint192 public totalCumulative;
    /// Root of the last settled epoch, and of the one before it.
    bytes32 public root;
    bytes32 public previousRoot;
    /// What each account has been paid to date.
    mapping(address account => uint256) public claimed;

    error NotSettler(address caller);
    error WrongEpoch(uint64 expected, uint64 got);
    error CumulativeDecreased(uint192 previous, uint192 proposed);
    error InvalidProof(address account, uint256 cumulativeAmount);
    error NothingToClaim(address account, uint256 cumulativeAmount, uint256 alreadyClaimed);

    event Settled(
        uint64 indexed epoch, bytes32 root, bytes32 dataHash, bytes32 daCommitment, uint256 totalCumulative
    );
    event Claimed(address indexed account, uint256 amount, uint256 cumulativeAmount);

    constructor(IERC20 token_, address settler_) {
        token = token_;
        settler = settler_;
    }

    /// @notice Publishes epoch `epoch_`'s root; `epoch_` must be the last settled epoch plus one.
    function settle(uint64 epoch_, bytes32 root_, bytes32 dataHash, bytes32 daCommitment, uint192 totalCumulative_)
        external
    {
        if (msg.sender != settler) revert NotSettler(msg.sender);
        uint64 expected = epoch + 1;
        if (epoch_ != expected) revert WrongEpoch(expected, epoch_);
        if (totalCumulative_ < totalCumulative) revert CumulativeDecreased(totalCumulative, totalCumulative_);
        (epoch, totalCumulative) = (epoch_, totalCumulative_);
        previousRoot = root;
        root = root_;
        emit Settled(epoch_, root_, dataHash, daCommitment, totalCumulative_);
    }

    /// @notice Pays `account` its `cumulativeAmount` minus what it was already paid, given the
    /// proof of leaf `(account, cumulativeAmount)` in the current or the previous root.
    function claim(address account, uint256 cumulativeAmount, bytes32[] calldata proof) external returns (uint256) {
        bytes32 leaf = keccak256(bytes.concat(keccak256(abi.encode(account, cumulativeAmount))));
        if (!MerkleProof.verifyCalldata(proof, root, leaf) && !MerkleProof.verifyCalldata(proof, previousRoot, leaf)) {
            revert InvalidProof(account, cumulativeAmount);
        }
        uint256 already = claimed[account];
        if (cumulativeAmount <= already) revert NothingToClaim(account, cumulativeAmount, already);
        uint256 amount = cumulativeAmount - already;
        claimed[account] = cumulativeAmount;
        token.safeTransfer(account, amount);
        emit Claimed(account, amount, cumulativeAmount);
        return amount;
    }
}
