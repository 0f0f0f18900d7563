// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

/// The Foundry cheatcodes these tests use (forge-std is not installed: this is its interface).
interface Vm {
    function prank(address sender) external;
    function expectRevert(bytes calldata revertData) external;
    function expectRevert() external;
    function roll(uint256 blockNumber) external;
    function cool(address target) external;
    function warp(uint256 timestamp) external;
    function ffi(string[] calldata command) external returns (bytes memory);
    function envString(string calldata name) external view returns (string memory);
    function parseJsonBytes32Array(string calldata json, string calldata key) external pure returns (bytes32[] memory);
    function parseJsonUint(string calldata json, string calldata key) external pure returns (uint256);
    function parseJsonBytes32(string calldata json, string calldata key) external pure returns (bytes32);
    function toString(uint256 value) external pure returns (string memory);
    function toString(address value) external pure returns (string memory);
}

Vm constant vm = Vm(address(uint160(uint256(keccak256("hevm cheat code")))));

/// Gas a transaction pays before it runs: 21,000 plus 16 per non-zero and 4 per zero calldata byte.
function intrinsicGas(bytes memory data) pure returns (uint256 gas) {
    gas = 21_000;
    for (uint256 i = 0; i < data.length; i++) {
        gas += data[i] == 0 ? 4 : 16;
    }
}
