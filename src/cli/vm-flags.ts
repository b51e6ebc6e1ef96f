/** The flags that say what VM to boot, shared by `exec` and `up`, and the VmOptions they give. */
import { Command, Option } from 'commander';
import type { AccelChoice } from '../accel/index.js';
import { BACKEND_CHOICES, type BackendChoice } from '../backends/index.js';
import { DEFAULT_CPUS, DEFAULT_MEMORY_MIB } from '../exec/default-image.js';
import { NET_MODES, type NetMode } from '../net/spec.js';
import type { VmOptions } from '../sdk/options.js';
import { CPUS_RANGE } from '../sdk/parse.js';
import { accelOption, collect, parseFlakeRefFlag, parseIntegerIn, parseMemory } from './parse.js';

export interface VmFlags {
  cpus?: number;
  memory?: number;
  backend?: BackendChoice;
  accel?: AccelChoice;
  addDir: string[];
  template?: string;
  manifest?: string;
  flake?: string;
  /** false with --no-snapshot. */
  snapshot: boolean;
  net?: NetMode;
  allowHost: string[];
  publish: string[];
}

/** Adds the VM flags to `command`; `syncNote` says when rw directories are synced back. */
export function addVmFlags(command: Command, { syncNote }: { syncNote: string }): Command {
  return command
    // No commander default: left out, a template's own size applies.
    .option('--cpus <n>', `virtual CPUs (default ${DEFAULT_CPUS}, or the template's)`, parseIntegerIn(CPUS_RANGE.min, CPUS_RANGE.max))
    .addOption(new Option('--memory <size>', `guest memory: K/M/G suffix, bare number = MiB (default ${DEFAULT_MEMORY_MIB}M, or the template's)`).argParser(parseMemory))
    .addOption(new Option('--backend <name>', 'VMM to use').choices(BACKEND_CHOICES))
    .addOption(accelOption())
    .option('-d, --add-dir <HOST:GUEST[:ro|rw]>', `mount a host directory in the guest; rw syncs changes back ${syncNote} (repeatable; HOST ends at the first colon)`, collect, [])
    .addOption(new Option('--template <NAME|DIR>', 'boot this template (mvmctl template build), by name or directory, instead of the default image; restores its snapshot when it has one').conflicts('manifest'))
    .option('-m, --manifest <NAME|DIR>', 'the same as --template (upstream mvmctl spelling)')
    .addOption(
      new Option('--flake <REF>', 'boot the guest this Nix flake builds (nix build REF: $out/vmlinux and $out/initrd or $out/rootfs.ext4), cached under its locked hash')
        .argParser(parseFlakeRefFlag)
        .conflicts(['template', 'manifest']),
    )
    .option('--no-snapshot', 'boot cold even when the image or template has a snapshot')
    .addOption(new Option('--net <mode>', "the guest's network: none (no NIC) or user (outbound through the host; default: none, or the template's)").choices(NET_MODES))
    .option('--allow-host <NAME[:PORT]>', 'let the guest reach only this host, over HTTP(S) through a proxy on the host (repeatable; no port: 80 and 443)', collect, [])
    .option('-p, --publish <[ADDRESS:]HOSTPORT:GUESTPORT>', 'forward a host TCP port (on 127.0.0.1 unless ADDRESS is given) to the guest (repeatable)', collect, []);
}

/** The VmOptions the flags give (JSON-safe: `up` hands them to its supervisor). */
export function vmOptionsFromFlags(flags: VmFlags): VmOptions {
  const template = flags.template ?? flags.manifest;
  return {
    ...(flags.cpus !== undefined ? { cpus: flags.cpus } : {}),
    ...(flags.memory !== undefined ? { memory: flags.memory } : {}),
    ...(flags.backend ? { backend: flags.backend } : {}),
    ...(flags.accel ? { accel: flags.accel } : {}),
    addDirs: flags.addDir,
    ...(template !== undefined ? { template } : {}),
    ...(flags.flake !== undefined ? { flake: flags.flake } : {}),
    noSnapshot: !flags.snapshot,
    ...(flags.net ? { net: flags.net } : {}),
    allowHosts: flags.allowHost,
    publish: flags.publish,
  };
}
