# Minimal OCI images of the two runtime binaries, as docker archives: the binary and its
# shared libraries, CA certificates, a non-root user, no shell. Timestamps are fixed, so
# the same revision always gives the same image digests, and the image is labelled with
# the source revision.
{
  pkgs,
  revision,
  fjord-server,
  fjord-consumer,
  fjord-healthcheck,
}:
let
  uid = "10001";
  # /etc/passwd and /etc/group with the one user the processes run as.
  users = pkgs.runCommand "fjord-users" { } ''
    mkdir -p $out/etc
    echo 'fjord:x:${uid}:${uid}:fjord:/var/empty:/sbin/nologin' > $out/etc/passwd
    echo 'fjord:x:${uid}:' > $out/etc/group
  '';

  image =
    {
      name,
      contents,
      ports ? { },
    }:
    pkgs.dockerTools.buildLayeredImage {
      inherit name;
      tag = builtins.substring 0 12 revision;
      contents = contents ++ [
        pkgs.cacert
        users
      ];
      created = "1970-01-01T00:00:01Z";
      config = {
        Entrypoint = [ "/bin/${name}" ];
        User = "${uid}:${uid}";
        Env = [
          "SSL_CERT_FILE=${pkgs.cacert}/etc/ssl/certs/ca-bundle.crt"
          "FJORD_LOG_FORMAT=json"
        ];
        ExposedPorts = ports;
        Labels = {
          "org.opencontainers.image.revision" = revision;
          "org.opencontainers.image.title" = name;
          "org.opencontainers.image.source" = "https://github.com/fjord-rs/fjord";
          "org.opencontainers.image.licenses" = "Apache-2.0";
        };
      };
    };

  server = image {
    name = "fjord-server";
    # The health probe the task definition's container health check runs.
    contents = [
      fjord-server
      fjord-healthcheck
    ];
    ports = {
      "8080/tcp" = { };
    };
  };
  consumer = image {
    name = "fjord-consumer";
    contents = [ fjord-consumer ];
  };
in
{
  inherit server consumer;
  both = pkgs.linkFarm "fjord-images" [
    {
      name = "fjord-server.tar.gz";
      path = server;
    }
    {
      name = "fjord-consumer.tar.gz";
      path = consumer;
    }
  ];
}
