import { Command } from 'commander';

/** `mvmctl compile MANIFEST.json --out DIR`; failures are MvmErrors for the main program to report. */
export function compileCommand(): Command {
  return new Command('compile')
    .description('Compile a Workload IR manifest into launch.json files for `mvmctl exec --launch-plan`')
    .argument('<manifest>', 'Workload IR manifest (JSON with top-level "apps")')
    .requiredOption('--out <dir>', 'output directory: DIR/launch.json for one app, DIR/<app>/launch.json for several')
    .option('-v, --verbose', 'also list manifest fields that are not carried into the launch.json files')
    .action(async (manifest: string, options: { out: string; verbose?: boolean }) => {
      // Loaded on use: the schema library costs a noticeable part of every mvmctl start-up.
      const { compileManifest } = await import('../launchplan/index.js');
      const result = await compileManifest(manifest, options.out);
      if (options.verbose) {
        for (const field of result.ignoredFields) process.stderr.write(`mvmctl: ignored field ${field}\n`);
      }
      for (const file of result.files) process.stdout.write(`wrote ${file}\n`);
    });
}
