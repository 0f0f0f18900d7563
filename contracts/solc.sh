#!/bin/sh
# solc's command line for forge, served by the npm `solc` package (solc-js): forge asks
# `--version`, then compiles with `--standard-json` on stdin. No compiler is downloaded.
mods=${LEDGERFLOW_CHAIN_MODULES:?set LEDGERFLOW_CHAIN_MODULES to a node_modules holding solc}
for a in "$@"; do
  if [ "$a" = "--version" ]; then
    echo "solc, the solidity compiler commandline interface"
    echo "Version: $(node -e "console.log(require('$mods/solc').version())" | sed 's/Emscripten.clang/Linux.g++/')"
    exit 0
  fi
done
exec node -e "
let s = '';
process.stdin.on('data', (d) => (s += d)).on('end', () => process.stdout.write(require('$mods/solc').compile(s)));"
