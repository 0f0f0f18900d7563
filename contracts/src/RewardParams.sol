// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {Ownable} from "@openzeppelin/contracts/access/Ownable.sol";
import {Checkpoints} from "@openzeppelin/contracts/utils/structs/Checkpoints.sol";

/// @title Governance parameters of reward epochs, checkpointed by epoch.
/// @notice The attribution threshold (scores below it earn nothing, in millionths) and the
/// emission per epoch (token base units) that apply from a given epoch on. The owner is a
/// TimelockController that a Governor controls, so every change is voted, delayed and public
/// before it applies; past epochs keep the values they were computed with.
contract RewardParams is Ownable {
    using Checkpoints for Checkpoints.Trace224;

    Checkpoints.Trace224 private _threshold;
    Checkpoints.Trace224 private _emission;

    error EpochInThePast(uint32 fromEpoch, uint32 latest);

    event ParamsSet(uint32 indexed fromEpoch, uint224 attributionThreshold, uint224 emission);

    constructor(address owner_, uint224 threshold, uint224 emission_) Ownable(owner_) {
        _threshold.push(0, threshold);
        _emission.push(0, emission_);
        emit ParamsSet(0, threshold, emission_);
    }

    /// @notice Sets both values from epoch `fromEpoch` on (not before the latest checkpoint).
    function setParams(uint32 fromEpoch, uint224 threshold, uint224 emission_) external onlyOwner {
        (, uint32 latest,) = _threshold.latestCheckpoint();
        if (fromEpoch < latest) revert EpochInThePast(fromEpoch, latest);
        _threshold.push(fromEpoch, threshold);
        _emission.push(fromEpoch, emission_);
        emit ParamsSet(fromEpoch, threshold, emission_);
    }

    /// @notice The attribution threshold in force at `epoch`.
    function attributionThreshold(uint32 epoch) external view returns (uint224) {
        return _threshold.upperLookup(epoch);
    }

    /// @notice The emission in force at `epoch`.
    function emission(uint32 epoch) external view returns (uint224) {
        return _emission.upperLookup(epoch);
    }
}
