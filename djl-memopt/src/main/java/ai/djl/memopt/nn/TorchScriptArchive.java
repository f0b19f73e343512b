package ai.djl.memopt.nn;

import com.google.common.base.Preconditions;
import java.io.ByteArrayOutputStream;
import java.io.IOException;
import java.io.UncheckedIOException;
import java.nio.charset.StandardCharsets;
import java.util.regex.Pattern;
import java.util.zip.CRC32;
import java.util.zip.ZipEntry;
import java.util.zip.ZipOutputStream;

/**
 * Writes a TorchScript archive, the zip that {@code torch.jit.save} writes and {@code torch::jit::load} reads, for a
 * module whose only state is its {@code training} flag: its TorchScript source is compiled by libtorch when the
 * archive is loaded, so no Python is needed anywhere.
 *
 * <p>The entries, all stored (not deflated), under one top folder {@code <name>/}:
 *
 * <ul>
 *   <li>{@code data.pkl}: a protocol-2 pickle of the module object, {@code GLOBAL __torch__ <Class>}, an empty tuple,
 *       {@code NEWOBJ}, then a dict {@code {"training": False}} applied with {@code BUILD} (libtorch's unpickler fills
 *       the class's attribute slots from that dict);
 *   <li>{@code code/__torch__.py}: the source of {@code class <Class>(Module)} (the qualifier {@code __torch__.<Class>}
 *       resolves to that file);
 *   <li>{@code constants.pkl}: an empty tuple (the module has no tensor constants);
 *   <li>{@code version}: the file format version, 9 (libtorch 2.x reads 1 to 10; 9 is past every operator upgrader a
 *       current source would trigger).
 * </ul>
 *
 * <p>Usage: {@code TorchScriptModules.load("DecodeStep", source)} (compiled once per process), or
 * {@code byte[] zip = TorchScriptArchive.write("DecodeStep", source);} then
 * {@code JniUtils.loadModule(manager, new ByteArrayInputStream(zip), true, false)}.
 */
public final class TorchScriptArchive {

    static final String FILE_FORMAT_VERSION = "9";
    private static final Pattern IDENTIFIER = Pattern.compile("[A-Za-z_][A-Za-z0-9_]*");

    private TorchScriptArchive() {}

    /**
     * @param className the module's class name: an identifier, qualified as {@code __torch__.<className>}
     * @param classBody the class's members (attribute declarations and methods), indented by two spaces, each method
     *     with {@code self} typed as {@code __torch__.<className>}
     */
    public static byte[] write(String className, String classBody) {
        Preconditions.checkArgument(IDENTIFIER.matcher(className).matches(),
                "TorchScript class name '%s' is not an identifier", className);
        String source = "class " + className + "(Module):\n"
                + "  __parameters__ = []\n"
                + "  __buffers__ = []\n"
                + "  training : bool\n"
                + classBody;
        String folder = "archive/";
        ByteArrayOutputStream bytes = new ByteArrayOutputStream();
        try (ZipOutputStream zip = new ZipOutputStream(bytes)) {
            store(zip, folder + "data.pkl", modulePickle(className));
            store(zip, folder + "code/__torch__.py", source.getBytes(StandardCharsets.UTF_8));
            store(zip, folder + "constants.pkl", new byte[] {(byte) 0x80, 2, ')', '.'});
            store(zip, folder + "version", (FILE_FORMAT_VERSION + "\n").getBytes(StandardCharsets.US_ASCII));
        } catch (IOException e) {
            throw new UncheckedIOException("cannot write the TorchScript archive of " + className, e);
        }
        return bytes.toByteArray();
    }

    /** {@code __torch__.<className>()} with {@code training = False}, as a protocol-2 pickle. */
    private static byte[] modulePickle(String className) {
        ByteArrayOutputStream p = new ByteArrayOutputStream();
        p.write(0x80); // PROTO
        p.write(2);
        p.writeBytes(("c__torch__\n" + className + "\n").getBytes(StandardCharsets.US_ASCII)); // GLOBAL
        p.write(')'); // EMPTY_TUPLE
        p.write(0x81); // NEWOBJ
        p.write('}'); // EMPTY_DICT
        p.write('('); // MARK
        byte[] key = "training".getBytes(StandardCharsets.UTF_8);
        p.write('X'); // BINUNICODE, 4-byte little-endian length
        p.write(key.length);
        p.write(0);
        p.write(0);
        p.write(0);
        p.writeBytes(key);
        p.write(0x89); // NEWFALSE
        p.write('u'); // SETITEMS
        p.write('b'); // BUILD
        p.write('.'); // STOP
        return p.toByteArray();
    }

    private static void store(ZipOutputStream zip, String name, byte[] data) throws IOException {
        ZipEntry entry = new ZipEntry(name);
        entry.setMethod(ZipEntry.STORED);
        entry.setSize(data.length);
        entry.setCompressedSize(data.length);
        CRC32 crc = new CRC32();
        crc.update(data);
        entry.setCrc(crc.getValue());
        zip.putNextEntry(entry);
        zip.write(data);
        zip.closeEntry();
    }
}
