// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {Vm, vm, intrinsicGas} from "./Vm.sol";
import {EpochRewards} from "../src/EpochRewards.sol";
import {OpenToken} from "../src/OpenToken.sol";

/// EpochRewards against trees and proofs made by `ledgerflow rewards tree|proof` (the binary in
/// $LEDGERFLOW_BIN, called through ffi): claims, double claims, the previous root, wrong epochs,
/// bad proofs, and the gas of `settle` and of a claim at 131,072 leaves.
contract EpochRewardsTest {
    OpenToken token;
    EpochRewards rewards;
    address settler = address(0x5e771e5);
    string dir;

    function setUp() public {
        token = new OpenToken(address(this));
        rewards = new EpochRewards(token, settler);
        token.mint(address(rewards), 10 ** 30);
        dir = vm.envString("LEDGERFLOW_FORGE_TMP");
    }

    function leaves(uint256 n, uint256 epoch) internal returns (string memory path) {
        path = string.concat(dir, "/leaves-", vm.toString(n), "-", vm.toString(epoch), ".csv");
        string[] memory cmd = new string[](5);
        (cmd[0], cmd[1], cmd[2], cmd[3], cmd[4]) =
            ("python3", "test/leaves.py", path, vm.toString(n), vm.toString(epoch));
        vm.ffi(cmd);
    }

    function root(string memory csv) internal returns (bytes32) {
        string[] memory cmd = new string[](5);
        (cmd[0], cmd[1], cmd[2], cmd[3], cmd[4]) = (vm.envString("LEDGERFLOW_BIN"), "rewards", "tree", "--leaves", csv);
        return bytes32(vm.ffi(cmd)); // ffi decodes the printed 0x… hex
    }

    function proof(string memory csv, address account) internal returns (uint256 amount, bytes32[] memory p) {
        string[] memory cmd = new string[](6);
        (cmd[0], cmd[1], cmd[2], cmd[3], cmd[4], cmd[5]) =
            (vm.envString("LEDGERFLOW_BIN"), "rewards", "proof", vm.toString(account), "--leaves", csv);
        string memory json = string(vm.ffi(cmd));
        amount = vm.parseJsonUint(json, ".amount");
        p = vm.parseJsonBytes32Array(json, ".proof");
    }

    function settle(uint64 epoch, bytes32 r, uint192 total) internal {
        vm.prank(settler);
        rewards.settle(epoch, r, keccak256("data"), keccak256("cert"), total);
    }

    function test_claims_pay_the_cumulative_difference_once() public {
        string memory one = leaves(5, 1);
        string memory two = leaves(5, 2);
        settle(1, root(one), 0);
        address a = address(2);
        (uint256 amount1, bytes32[] memory p1) = proof(one, a);
        require(rewards.claim(a, amount1, p1) == amount1, "first claim pays the epoch-1 amount");
        require(token.balanceOf(a) == amount1, "balance");
        vm.expectRevert(abi.encodeWithSelector(EpochRewards.NothingToClaim.selector, a, amount1, amount1));
        rewards.claim(a, amount1, p1);

        settle(2, root(two), 0);
        (uint256 amount2, bytes32[] memory p2) = proof(two, a);
        require(rewards.claim(a, amount2, p2) == amount2 - amount1, "second epoch pays the difference");
        require(token.balanceOf(a) == amount2, "balance equals the cumulative amount");

        // An account that never claimed can still use the previous root's leaf, then the rest.
        address b = address(4);
        (uint256 b1, bytes32[] memory q1) = proof(one, b);
        (uint256 b2, bytes32[] memory q2) = proof(two, b);
        rewards.claim(b, b1, q1);
        rewards.claim(b, b2, q2);
        require(token.balanceOf(b) == b2, "previous root, then current");
        require(token.balanceOf(address(rewards)) == 10 ** 30 - amount2 - b2, "paid out");
    }

    function test_settle_needs_the_settler_and_the_next_epoch() public {
        bytes32 r = keccak256("root");
        vm.expectRevert(abi.encodeWithSelector(EpochRewards.NotSettler.selector, address(this)));
        rewards.settle(1, r, 0, 0, 0);
        vm.prank(settler);
        vm.expectRevert(abi.encodeWithSelector(EpochRewards.WrongEpoch.selector, uint64(1), uint64(2)));
        rewards.settle(2, r, 0, 0, 0);
        settle(1, r, 10);
        vm.prank(settler);
        vm.expectRevert(abi.encodeWithSelector(EpochRewards.WrongEpoch.selector, uint64(2), uint64(1)));
        rewards.settle(1, r, 0, 0, 10);
        vm.prank(settler);
        vm.expectRevert(abi.encodeWithSelector(EpochRewards.CumulativeDecreased.selector, uint192(10), uint192(9)));
        rewards.settle(2, r, 0, 0, 9);
        require(rewards.epoch() == 1 && rewards.root() == r, "state unchanged by refused settles");
    }

    function test_bad_proofs_are_refused() public {
        string memory one = leaves(9, 1);
        settle(1, root(one), 0);
        (uint256 amount, bytes32[] memory p) = proof(one, address(3));
        vm.expectRevert(abi.encodeWithSelector(EpochRewards.InvalidProof.selector, address(3), amount + 1));
        rewards.claim(address(3), amount + 1, p);
        vm.expectRevert(abi.encodeWithSelector(EpochRewards.InvalidProof.selector, address(5), amount));
        rewards.claim(address(5), amount, p);
        p[0] = bytes32(uint256(p[0]) ^ 1);
        vm.expectRevert(abi.encodeWithSelector(EpochRewards.InvalidProof.selector, address(3), amount));
        rewards.claim(address(3), amount, p);
        // Two epochs later the epoch-1 root is gone.
        (, bytes32[] memory good) = proof(one, address(3));
        settle(2, root(leaves(9, 2)), 0);
        settle(3, root(leaves(9, 3)), 0);
        vm.expectRevert(abi.encodeWithSelector(EpochRewards.InvalidProof.selector, address(3), amount));
        rewards.claim(address(3), amount, good);
    }

    /// Transaction gas (execution + intrinsic) of a steady-state `settle` and of a first claim
    /// in a tree of 131,072 leaves (a 17-hash proof).
    function test_gas_settle_and_claim_at_131072_leaves() public {
        string memory big = leaves(131_072, 1);
        bytes32 r = root(big);
        // Steady state: from epoch 3 on every slot `settle` writes already holds a value.
        settle(1, keccak256("one"), 1);
        settle(2, keccak256("two"), 1);
        bytes memory data = abi.encodeCall(EpochRewards.settle, (3, r, keccak256("data"), keccak256("cert"), 2));
        // As in a transaction of its own: storage not yet touched (the contract itself is the
        // transaction's target, warm by EIP-2929).
        vm.cool(address(rewards));
        vm.prank(settler);
        uint256 before = gasleft();
        rewards.settle(3, r, keccak256("data"), keccak256("cert"), 2);
        uint256 settleGas = before - gasleft(); // measured before intrinsicGas runs
        settleGas += intrinsicGas(data);

        address account = address(77_777);
        (uint256 amount, bytes32[] memory p) = proof(big, account);
        require(p.length == 17, "17 siblings at 131,072 leaves");
        data = abi.encodeCall(EpochRewards.claim, (account, amount, p));
        vm.cool(address(rewards));
        vm.cool(address(token));
        before = gasleft();
        rewards.claim(account, amount, p);
        uint256 claimGas = before - gasleft();
        claimGas += intrinsicGas(data);
        emit log_gas("settle", settleGas);
        emit log_gas("claim at 131072 leaves", claimGas);
        require(settleGas <= 60_000, string.concat("settle gas ", vm.toString(settleGas)));
        require(claimGas <= 100_000, string.concat("claim gas ", vm.toString(claimGas)));
    }

    event log_gas(string what, uint256 gas);
}
