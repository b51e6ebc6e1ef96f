/**
 * A stand-in for the `firecracker` binary, for tests on hosts where Firecracker cannot run:
 * `main.js --api-sock PATH --id NAME` serves Firecracker's API (api-server.ts, validated against
 * firecracker-api.yaml) and boots the guest with QEMU (qemu-machine.ts). Like Firecracker it
 * exits when the guest ends. `--version` answers as Firecracker does, marked as the double.
 */
import { mkdir } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { serveApi } from './api-server.js';
import { QemuMachine } from './qemu-machine.js';

const VERSION = 'Firecracker v1.16.1 (mvmctl test double)';

function argument(args: string[], name: string): string | undefined {
  const at = args.indexOf(name);
  return at >= 0 ? args[at + 1] : undefined;
}

async function main(args: string[]): Promise<number> {
  if (args.includes('--version')) {
    process.stdout.write(VERSION + '\n');
    return 0;
  }
  const apiSock = argument(args, '--api-sock');
  const id = argument(args, '--id') ?? 'anonymous-instance';
  if (!apiSock) {
    process.stderr.write('usage: firecracker --api-sock PATH [--id NAME]\n');
    return 1;
  }
  const workDir = join(dirname(apiSock), `fc-double-${process.pid}`);
  await mkdir(workDir, { recursive: true, mode: 0o700 });
  const machine = new QemuMachine(id, workDir);
  const server = await serveApi(apiSock, machine, { id });
  const stop = async () => {
    await machine.stop();
    await server.close();
    process.exit(0);
  };
  process.once('SIGTERM', () => void stop());
  process.once('SIGINT', () => void stop());
  await machine.ended;
  await server.close();
  return 0;
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (error: unknown) => {
    process.stderr.write(`firecracker test double: ${error instanceof Error ? error.message : String(error)}\n`);
    process.exit(1);
  },
);
