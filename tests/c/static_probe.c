/* A statically linked program run as a plugin: the jail (built before
 * exec) applies to it too. It reports what it sees, then makes a call the
 * built-in seccomp policy forbids. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

int main(int argc, char **argv) {
    (void)argc;
    printf("static probe %s\n", argv[0]);
    int fd = open("/dev/kvm", O_RDWR);
    printf("open /dev/kvm: %s\n", fd < 0 ? strerror(errno) : "opened");
    fflush(stdout);
    socket(AF_INET, SOCK_STREAM, 0);
    printf("socket returned\n");
    return 0;
}
