package ai.djl.memopt.nn;

import ai.djl.Device;
import java.util.Locale;

/**
 * A two-way choice read from a system property, whose default is the GPU form on a GPU and the CPU form on the CPU
 * (where the memory targets and fixtures were measured): {@link FusedAttention}'s kernel, the scripted decoder layer.
 */
public final class DeviceDefaultSwitch {

    private DeviceDefaultSwitch() {}

    /**
     * @param property the system property
     * @param onValue the value that turns the GPU form on (case-insensitive)
     * @param offValue the value that turns it off
     * @return whether the GPU form is taken on {@code device}
     * @throws IllegalArgumentException if the property holds another value, naming it and the two expected
     */
    public static boolean enabled(String property, String onValue, String offValue, Device device) {
        String value = System.getProperty(property);
        if (value == null || value.isBlank()) {
            return device.isGpu();
        }
        String v = value.trim().toLowerCase(Locale.ROOT);
        if (v.equals(onValue)) {
            return true;
        }
        if (v.equals(offValue)) {
            return false;
        }
        throw new IllegalArgumentException("system property " + property + " is '" + value + "'; expected " + onValue
                + " or " + offValue);
    }
}
