// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {vm} from "./Vm.sol";
import {OpenToken} from "../src/OpenToken.sol";
import {StakedOpen} from "../src/StakedOpen.sol";
import {RewardParams} from "../src/RewardParams.sol";
import {RewardGovernor} from "../src/RewardGovernor.sol";
import {DatanetRegistry} from "../src/DatanetRegistry.sol";
import {TimelockController} from "@openzeppelin/contracts/governance/TimelockController.sol";
import {Ownable} from "@openzeppelin/contracts/access/Ownable.sol";
import {IGovernor} from "@openzeppelin/contracts/governance/IGovernor.sol";

/// RewardParams owned by a timelock under a governor whose votes are staked $OPEN: a change is
/// proposed, voted, queued,
/// delayed and executed, applies from its epoch on, and nobody else can make it. Plus the
/// Datanet registry's content roots.
contract GovernanceTest {
    OpenToken open;
    StakedOpen token;
    TimelockController timelock;
    RewardGovernor governor;
    RewardParams params;
    address voter = address(0xB0B);

    function setUp() public {
        vm.warp(1_000_000);
        vm.roll(100);
        open = new OpenToken(address(this));
        token = new StakedOpen(open);
        open.mint(voter, 1_000_000e18);
        vm.prank(voter);
        open.approve(address(token), 1_000_000e18);
        vm.prank(voter);
        token.depositFor(voter, 1_000_000e18);
        vm.prank(voter);
        token.delegate(voter);
        address[] memory none = new address[](0);
        timelock = new TimelockController(2 days, none, none, address(this));
        governor = new RewardGovernor(token, timelock, 1, 50);
        timelock.grantRole(timelock.PROPOSER_ROLE(), address(governor));
        timelock.grantRole(timelock.EXECUTOR_ROLE(), address(0));
        timelock.renounceRole(timelock.DEFAULT_ADMIN_ROLE(), address(this));
        params = new RewardParams(address(timelock), 10_000, 1_000e18);
        vm.roll(101);
    }

    function test_a_voted_change_applies_from_its_epoch() public {
        address[] memory targets = new address[](1);
        uint256[] memory values = new uint256[](1);
        bytes[] memory calls = new bytes[](1);
        targets[0] = address(params);
        calls[0] = abi.encodeCall(RewardParams.setParams, (5, 20_000, 2_000e18));
        string memory description = "raise the threshold from epoch 5";
        bytes32 descriptionHash = keccak256(bytes(description));

        vm.prank(voter);
        uint256 id = governor.propose(targets, values, calls, description);
        vm.roll(block.number + 2);
        vm.prank(voter);
        governor.castVote(id, 1);
        vm.roll(block.number + 51);
        require(governor.state(id) == IGovernor.ProposalState.Succeeded, "vote passed");
        governor.queue(targets, values, calls, descriptionHash);
        // Not before the timelock's delay.
        vm.expectRevert();
        governor.execute(targets, values, calls, descriptionHash);
        vm.warp(block.timestamp + 2 days + 1);
        governor.execute(targets, values, calls, descriptionHash);

        require(params.attributionThreshold(4) == 10_000 && params.emission(4) == 1_000e18, "epoch 4 unchanged");
        require(params.attributionThreshold(5) == 20_000 && params.emission(5) == 2_000e18, "epoch 5 changed");
        require(params.attributionThreshold(900) == 20_000, "and after");
    }

    function test_only_the_timelock_sets_params() public {
        vm.expectRevert(abi.encodeWithSelector(Ownable.OwnableUnauthorizedAccount.selector, address(this)));
        params.setParams(1, 1, 1);
        vm.prank(address(timelock));
        params.setParams(3, 7, 7);
        vm.prank(address(timelock));
        vm.expectRevert(abi.encodeWithSelector(RewardParams.EpochInThePast.selector, uint32(2), uint32(3)));
        params.setParams(2, 8, 8);
    }

    function test_datanet_content_roots_prove_inclusion() public {
        DatanetRegistry registry = new DatanetRegistry(address(this));
        registry.register("legal");
        vm.expectRevert(abi.encodeWithSelector(DatanetRegistry.AlreadyRegistered.selector, "legal"));
        registry.register("legal");
        // A two-leaf StandardMerkleTree of bytes32 content hashes.
        bytes32 a = keccak256("contribution a");
        bytes32 b = keccak256("contribution b");
        bytes32 la = keccak256(bytes.concat(keccak256(abi.encode(a))));
        bytes32 lb = keccak256(bytes.concat(keccak256(abi.encode(b))));
        bytes32 root = la < lb ? keccak256(abi.encode(la, lb)) : keccak256(abi.encode(lb, la));
        registry.anchor("legal", 1, root, 2);
        vm.expectRevert(abi.encodeWithSelector(DatanetRegistry.RootAlreadySet.selector, "legal", uint64(1)));
        registry.anchor("legal", 1, root, 2);
        bytes32[] memory proof = new bytes32[](1);
        proof[0] = lb;
        require(registry.included("legal", 1, a, proof), "a is included");
        require(!registry.included("legal", 2, a, proof), "not in another epoch");
        vm.expectRevert(abi.encodeWithSelector(DatanetRegistry.UnknownDatanet.selector, "music"));
        registry.anchor("music", 1, root, 2);
        vm.prank(address(0xBAD));
        vm.expectRevert(abi.encodeWithSelector(DatanetRegistry.NotRegistrar.selector, address(0xBAD)));
        registry.anchor("legal", 2, root, 2);
    }
}
