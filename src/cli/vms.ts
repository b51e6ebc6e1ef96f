import { Command } from 'commander';
import { recoverInterruptedSyncs } from '../dirsync/index.js';
import { listVms, stopVm } from '../state/registry.js';
import { stopSupervised } from '../supervisor/client.js';
import { logLine } from './parse.js';
import { table } from './table.js';
import { MvmError } from '../errors.js';

function age(startedAt: string): string {
  const seconds = Math.max(0, Math.round((Date.now() - Date.parse(startedAt)) / 1000));
  if (seconds < 120) return `${seconds}s`;
  if (seconds < 7200) return `${Math.round(seconds / 60)}m`;
  return `${Math.round(seconds / 3600)}h`;
}

export function lsCommand(): Command {
  return new Command('ls')
    .description('list running microVMs (and clean up after runs that were killed, sync-backs included)')
    .option('--json', 'print JSON instead of a table')
    .action(async (options: { json?: boolean }) => {
      const vms = await listVms();
      // A sync-back a killed run left half applied is finished or rolled back, as the next exec would.
      await recoverInterruptedSyncs(logLine);
      if (options.json) {
        const out = vms.map(({ name, backend, command, startedAt, ownerPid, vmmPid, vmmRunning }) => ({ name, backend, command, startedAt, ownerPid, vmmPid, vmmRunning }));
        process.stdout.write(JSON.stringify(out, null, 2) + '\n');
        return;
      }
      const rows = [['NAME', 'BACKEND', 'PID', 'AGE', 'COMMAND']];
      for (const vm of vms) rows.push([vm.name, vm.backend, String(vm.ownerPid), age(vm.startedAt), vm.command.join(' ')]);
      process.stdout.write(table(rows));
    });
}

export function downCommand(): Command {
  return new Command('down')
    .description('stop running microVMs (an `up` VM stops cleanly: rw directories are synced back)')
    .argument('[names...]', 'VM names, as `mvmctl ls` shows them')
    .option('--all', 'stop every running VM')
    .action(async (names: string[], options: { all?: boolean }) => {
      if (options.all && names.length > 0) throw new MvmError('give VM names or --all, not both');
      if (!options.all && names.length === 0) throw new MvmError('name the VMs to stop (see `mvmctl ls`), or pass --all');
      const targets = options.all ? (await listVms()).map((vm) => vm.name) : names;
      // An `up` VM's supervisor stops it cleanly; an exec's VM is stopped through its mvmctl.
      await Promise.all(targets.map(async (name) => (await stopSupervised(name, logLine)) || stopVm(name)));
      for (const name of targets) process.stdout.write(`${name}\n`);
    });
}
