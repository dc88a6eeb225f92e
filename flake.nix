{
  description = "Fjord: Kafka topics to browsers and phones over Server-Sent Events";

  inputs = {
    nixpkgs.url = "github:NixOS/nixpkgs/nixos-26.05";
    crane.url = "github:ipetkov/crane";
    rust-overlay = {
      url = "github:oxalica/rust-overlay";
      inputs.nixpkgs.follows = "nixpkgs";
    };
  };

  # nix build .#images               result/fjord-server.tar.gz, result/fjord-consumer.tar.gz,
  #                                  result/fjord-dev.tar.gz (`fjord dev`, see the README)
  # nix run .#deploy -- manifest.json  pushes x86_64 images and deploys them (docs/deploy.md);
  #                                  also on macOS, with a Linux builder for the images
  # nix run .#fjord-deploy -- status manifest.json   the tool alone, no image built
  # nix flake check                  clippy, unit tests, rustfmt, and every package
  # nix develop                      toolchain plus the services the tests start
  outputs =
    {
      self,
      nixpkgs,
      crane,
      rust-overlay,
      ...
    }:
    let
      linuxSystems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      darwinSystems = [
        "aarch64-darwin"
        "x86_64-darwin"
      ];
      systems = linuxSystems ++ darwinSystems;
      isLinux = system: builtins.elem system linuxSystems;
      eachSystem = f: nixpkgs.lib.genAttrs systems (system: f system fjord.${system});

      fjord = nixpkgs.lib.genAttrs systems (
        system:
        import ./nix/packages.nix {
          pkgs = nixpkgs.legacyPackages.${system}.extend rust-overlay.overlays.default;
          inherit crane;
          revision = self.rev or "dirty";
        }
      );

      # The images run on Linux, for the manifest's `deploy.architecture`. On a Mac they are
      # built by a Linux builder (docs/deploy.md, "From a Mac"); the deploy tool itself runs natively.
      linuxFor = {
        x86_64 = "x86_64-linux";
        arm64 = "aarch64-linux";
      };
      # The architecture of this machine's CPU: what `images` (for local use) are built for.
      nativeArchitecture =
        system: if builtins.substring 0 8 system == "aarch64-" then "arm64" else "x86_64";
      linuxFjord = architecture: fjord.${linuxFor.${architecture}};
      deployApp = fjordHere: architecture: {
        type = "app";
        program = "${fjordHere.deployWith (linuxFjord architecture).imageArchives}/bin/fjord-deploy";
      };
    in
    {
      packages = eachSystem (
        system: fjordHere:
        {
          inherit (fjordHere) fjord-deploy;
          default = fjordHere.fjord-deploy;
          images = (linuxFjord (nativeArchitecture system)).images;
          images-x86_64 = (linuxFjord "x86_64").images;
          images-arm64 = (linuxFjord "arm64").images;
        }
        // nixpkgs.lib.optionalAttrs (isLinux system) {
          inherit (fjordHere)
            fjord
            fjord-server
            fjord-consumer
            fjord-healthcheck
            ;
        }
      );

      # nix run .#deploy         x86_64 images, as the manifest's `deploy.architecture` is
      #                          unless it says otherwise, whatever this machine's CPU
      # nix run .#deploy-arm64   images for `"architecture": "arm64"` (Graviton)
      # nix run .#fjord-deploy   the tool alone, no image built: bootstrap, destroy, status,
      #                          diff, rollback, verify, policy
      apps = eachSystem (
        system: fjordHere: {
          deploy = deployApp fjordHere "x86_64";
          deploy-x86_64 = deployApp fjordHere "x86_64";
          deploy-arm64 = deployApp fjordHere "arm64";
          fjord-deploy = {
            type = "app";
            program = "${fjordHere.deployTool}/bin/fjord-deploy";
          };
        }
      );

      checks = eachSystem (_: fjordHere: fjordHere.checks);

      devShells = eachSystem (
        _: fjordHere: {
          default = fjordHere.devShell;
        }
      );
    };
}
