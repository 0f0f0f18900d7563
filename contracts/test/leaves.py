# Deterministic reward leaves for the forge tests: writes N `address,amount` lines to PATH.
# The accounts are 0x...0001, 0x...0002, … (so a test knows them); amounts are fixed functions
# of the index and the epoch.   python3 leaves.py PATH N EPOCH
import sys

path, n, epoch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with open(path, "w") as f:
    f.write("address,amount\n")
    for i in range(1, n + 1):
        f.write("0x%040x,%d\n" % (i, (i * 1_000_003 % 9_973 + 1) * 10**15 * epoch))
