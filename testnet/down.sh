#!/usr/bin/env bash
# Stops the testnet and forgets its data.
set -euo pipefail
cd "$(dirname "$0")"
NODE_A_ID=none docker-compose -p metainf down -v --remove-orphans
rm -rf .data
