// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";
import {ERC20Permit} from "@openzeppelin/contracts/token/ERC20/extensions/ERC20Permit.sol";
import {Ownable} from "@openzeppelin/contracts/access/Ownable.sol";

/// @title TEST token standing in for $OPEN on local chains (never deploy it as the real token).
/// @notice A plain ERC-20 (with permit), minted by its owner: the unit rewards are paid in.
/// Voting power is `StakedOpen`, its wrapper, so a reward transfer carries no vote bookkeeping.
contract OpenToken is ERC20, ERC20Permit, Ownable {
    constructor(address owner_) ERC20("OPEN (test)", "tOPEN") ERC20Permit("OPEN (test)") Ownable(owner_) {}

    function mint(address to, uint256 amount) external onlyOwner {
        _mint(to, amount);
    }
}
