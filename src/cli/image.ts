import { Command, Option } from 'commander';
import { accelChoice, type AccelChoice } from '../accel/index.js';
import { BACKEND_CHOICES, backendChoice, selectBackend, type BackendChoice } from '../backends/index.js';
import { planBootAccel } from '../vm/index.js';
import { DEFAULT_CPUS, DEFAULT_MEMORY_MIB, ensureDefaultSnapshot } from '../exec/default-image.js';
import { defaultImageStatus, ensureDefaultImage, type GuestImage } from '../image/index.js';
import { readSnapshotMeta } from '../snapshots/index.js';
import { accelOption, bootTimeoutFromEnv, logLine } from './parse.js';
import { readKernelBuildInfo } from '../image/kernel.js';
import { progressReporter } from '../progress.js';
import { runInterruptibly } from './signals.js';

function mib(bytes: number): string {
  return `${(bytes / 1048576).toFixed(1)} MiB`;
}

async function describe(image: GuestImage): Promise<string[]> {
  const m = image.manifest;
  const build = m.kernel.origin === 'built' ? await readKernelBuildInfo(m.kernel.path) : undefined;
  const kernelFrom =
    m.kernel.origin === 'user'
      ? 'your kernel (--kernel / MVM_KERNEL)'
      : `built from kernel/guest.config${build?.release ? `, Linux ${build.release}` : ''}${build ? `, in ${Math.round(build.buildSeconds)}s` : ''}`;
  return [
    `name:        ${image.name}`,
    `id:          ${m.id}`,
    `directory:   ${image.dir}`,
    `created:     ${m.createdAt}`,
    `kernel:      ${image.kernel} (${mib(m.kernel.size)}, ${kernelFrom})`,
    `             sha256 ${m.kernel.sha256}`,
    `initrd:      ${image.initrd} (${mib(m.initrd.size)}, ${m.initrd.compression === 'none' ? 'uncompressed' : m.initrd.compression} cpio, layout ${m.layoutVersion})`,
    `agent:       ${m.agent.path} (${m.agent.version ?? 'version unknown'}, sha256 ${m.agent.sha256.slice(0, 16)}…)`,
    `busybox:     ${m.busybox.path} (sha256 ${m.busybox.sha256.slice(0, 16)}…)`,
    `kernel args: ${image.kernelArgs.join(' ')}`,
    `snapshot:    ${await snapshotLine(image)}`,
  ];
}

async function snapshotLine(image: GuestImage): Promise<string> {
  const found = await readSnapshotMeta(image.dir).catch(() => 'damaged' as const);
  if (found === 'damaged') return 'damaged (unreadable metadata): `mvmctl image build --force` retakes it';
  if (!found) return 'none yet (taken by `mvmctl image build` or the first exec that can use it)';
  const m = found.meta;
  return `taken ${m.createdAt} under ${m.accel === 'kvm' ? 'KVM' : 'TCG'}, ${m.cpus} CPUs, ${m.memoryMiB} MiB (${found.dir})`;
}

/** `mvmctl image build|info`: the default guest image (kernel + initramfs with busybox and the agent). */
export function imageCommand(): Command {
  const image = new Command('image').description('build or inspect the default guest image (kernel + initramfs)');

  image
    .command('build')
    .description('build the default guest image now (the first build compiles a kernel: about 10 minutes)')
    .option('--kernel <path>', 'use this uncompressed vmlinux instead of building one (also MVM_KERNEL)')
    .option('--force', 'rebuild the initramfs even when it is up to date, and retake its snapshot')
    .option('--no-snapshot', 'do not take the snapshot exec restores from (the first exec that can use it will)')
    .addOption(new Option('--backend <name>', 'VMM to take the snapshot with').choices(BACKEND_CHOICES))
    .addOption(accelOption())
    .option('-v, --verbose', 'show progress even when stderr is not a terminal')
    .action(async (options: { kernel?: string; force?: boolean; snapshot: boolean; backend?: BackendChoice; accel?: AccelChoice; verbose?: boolean }) => {
      const progress = progressReporter({ force: options.verbose });
      const backend = selectBackend(backendChoice(options.backend));
      const choice = accelChoice(options.accel);
      process.exitCode = await runInterruptibly(async (signal) => {
        const built = await ensureDefaultImage({ progress, signal, kernelPath: options.kernel, force: options.force });
        if (options.snapshot) {
          const accel = await planBootAccel(backend, choice, built.kernelSha256, logLine);
          const request = { cpus: DEFAULT_CPUS, memoryMiB: DEFAULT_MEMORY_MIB, addDirs: 0, nic: false, noSnapshot: false };
          const result = await ensureDefaultSnapshot(built, accel, { backend, request, bootTimeoutMs: bootTimeoutFromEnv(), log: logLine, progress, signal });
          if (result.warning) logLine(result.warning);
          else if (result.note && options.verbose) logLine(result.note);
        }
        process.stdout.write((await describe(built)).join('\n') + '\n');
        return 0;
      });
    });

  image
    .command('info')
    .description('show the default guest image and whether it is up to date (builds nothing)')
    .option('--kernel <path>', 'compare against this kernel instead of the built one (also MVM_KERNEL)')
    .option('--json', 'print the manifest as JSON')
    .action(async (options: { kernel?: string; json?: boolean }) => {
      const status = await defaultImageStatus({ kernelPath: options.kernel });
      if (options.json) {
        const out = status.image
          ? { ...status.image, upToDate: status.staleReasons.length === 0, staleReasons: status.staleReasons }
          : { upToDate: false, staleReasons: status.staleReasons };
        process.stdout.write(JSON.stringify(out, null, 2) + '\n');
        return;
      }
      const lines = status.image ? await describe(status.image) : ['default-microvm image: not built yet'];
      lines.push(
        status.staleReasons.length === 0
          ? 'status:      up to date'
          : `status:      ${status.image ? 'out of date' : 'missing'} (${status.staleReasons.join('; ')}); \`mvmctl image build\` or the next \`mvmctl exec\` builds it`,
      );
      process.stdout.write(lines.join('\n') + '\n');
    });

  return image;
}
