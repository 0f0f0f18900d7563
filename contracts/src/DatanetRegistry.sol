// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {MerkleProof} from "@openzeppelin/contracts/utils/cryptography/MerkleProof.sol";

/// @title Datanets on chain, and per epoch the root of the contributions each accepted.
/// @notice A Datanet is registered under its name by its owner. Every epoch the registrar (the
/// settler) anchors the Merkle root of the content hashes the Datanet accepted in it — a
/// StandardMerkleTree of `bytes32` leaves — so any contribution can prove its inclusion.
contract DatanetRegistry {
    struct Datanet {
        address owner;
        uint64 registeredAt;
    }

    /// May anchor roots.
    address public immutable registrar;
    mapping(bytes32 nameHash => Datanet) public datanets;
    mapping(bytes32 nameHash => mapping(uint64 epoch => bytes32 root)) public contentRoots;

    error AlreadyRegistered(string name);
    error UnknownDatanet(string name);
    error NotRegistrar(address caller);
    error RootAlreadySet(string name, uint64 epoch);

    event DatanetRegistered(bytes32 indexed nameHash, string name, address owner);
    event ContentRootAnchored(bytes32 indexed nameHash, uint64 indexed epoch, bytes32 root, uint256 contributions);

    constructor(address registrar_) {
        registrar = registrar_;
    }

    function register(string calldata name) external {
        bytes32 id = keccak256(bytes(name));
        if (datanets[id].owner != address(0)) revert AlreadyRegistered(name);
        datanets[id] = Datanet(msg.sender, uint64(block.timestamp));
        emit DatanetRegistered(id, name, msg.sender);
    }

    /// @notice Anchors the root of the content hashes `name` accepted in `epoch` (once).
    function anchor(string calldata name, uint64 epoch, bytes32 root, uint256 contributions) external {
        if (msg.sender != registrar) revert NotRegistrar(msg.sender);
        bytes32 id = keccak256(bytes(name));
        if (datanets[id].owner == address(0)) revert UnknownDatanet(name);
        if (contentRoots[id][epoch] != bytes32(0)) revert RootAlreadySet(name, epoch);
        contentRoots[id][epoch] = root;
        emit ContentRootAnchored(id, epoch, root, contributions);
    }

    /// @notice Whether `contentHash` is among what `name` accepted in `epoch`.
    function included(string calldata name, uint64 epoch, bytes32 contentHash, bytes32[] calldata proof)
        external
        view
        returns (bool)
    {
        bytes32 leaf = keccak256(bytes.concat(keccak256(abi.encode(contentHash))));
        return MerkleProof.verifyCalldata(proof, contentRoots[keccak256(bytes(name))][epoch], leaf);
    }
}
